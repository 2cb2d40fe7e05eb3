//! The actuator that starts nothing: the desired worker count is only exported, as
//! `sparkle_workers_desired`, for an autoscaler outside Sparkle to act on (KEDA's Prometheus
//! scaler, a Kubernetes HPA on an external metric, an AWS Auto Scaling group through the
//! CloudWatch agent). It takes the count it last asked for as the count running.

use crate::{Actuator, ScalerError};
use async_trait::async_trait;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct MetricOnly {
    desired: u32,
}

#[async_trait]
impl Actuator for MetricOnly {
    async fn current(&mut self) -> u32 {
        self.desired
    }

    async fn scale_to(&mut self, desired: u32) -> Result<(), ScalerError> {
        self.desired = desired;
        Ok(())
    }

    async fn stop_all(&mut self, _drain: Duration) {
        self.desired = 0;
    }
}
