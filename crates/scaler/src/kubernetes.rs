//! The Kubernetes actuator: the workers are a Deployment, and the scaler sets its replica
//! count through the scale subresource (`GET`/`PATCH
//! /apis/apps/v1/namespaces/NS/deployments/NAME/scale`), which is all its Role allows.
//! Kubernetes does the starting and the stopping; a stopping pod gets SIGTERM and its worker
//! finishes or gives back its batch within the pod's grace period.

use crate::{Actuator, ScalerError};
use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use std::time::Duration;

pub struct KubernetesDeployment {
    api: Api<Deployment>,
    name: String,
    /// What the Deployment was last seen at, for when the API cannot be reached.
    last: u32,
}

impl KubernetesDeployment {
    /// The Deployment `name` in `namespace` (unset: the client's own namespace), through
    /// `client` (in-cluster configuration or a kubeconfig: [`KubernetesDeployment::connect`]).
    pub fn new(client: kube::Client, namespace: Option<&str>, name: &str) -> Self {
        let api = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::default_namespaced(client),
        };
        KubernetesDeployment {
            api,
            name: name.to_string(),
            last: 0,
        }
    }

    /// A client from the pod's service account, or from the kubeconfig outside a cluster.
    pub async fn connect() -> Result<kube::Client, ScalerError> {
        kube::Client::try_default()
            .await
            .map_err(|e| ScalerError::Kubernetes(e.to_string()))
    }

    async fn replicas(&self) -> Result<u32, kube::Error> {
        let scale = self.api.get_scale(&self.name).await?;
        let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
        Ok(u32::try_from(replicas).unwrap_or(0))
    }
}

#[async_trait]
impl Actuator for KubernetesDeployment {
    async fn current(&mut self) -> u32 {
        match self.replicas().await {
            Ok(n) => self.last = n,
            Err(e) => {
                tracing::warn!(deployment = %self.name, error = %e, "cannot read the workers' scale")
            }
        }
        self.last
    }

    async fn scale_to(&mut self, desired: u32) -> Result<(), ScalerError> {
        let patch = serde_json::json!({ "spec": { "replicas": desired } });
        self.api
            .patch_scale(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| ScalerError::Kubernetes(e.to_string()))?;
        tracing::info!(deployment = %self.name, replicas = desired, "scaled the workers");
        self.last = desired;
        Ok(())
    }

    /// The workers outlive the scaler: a scaler restarting leaves them as they are.
    async fn stop_all(&mut self, _drain: Duration) {}
}
