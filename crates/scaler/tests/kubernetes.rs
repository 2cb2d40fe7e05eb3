//! The Kubernetes actuator against a stand-in for the API server that speaks the scale
//! subresource's JSON as Kubernetes does: it reads the Deployment's replica count, sets it
//! with a merge patch, and touches nothing else.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{json, Value};
use sparkle_scaler::{Actuator, KubernetesDeployment};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct FakeApi {
    replicas: Mutex<i64>,
    /// (method, path, content type, body)
    seen: Mutex<Vec<(String, String, String, Value)>>,
}

fn scale(ns: &str, name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": "app.kubernetes.io/name=sparkle-worker"},
    })
}

async fn scale_route(
    State(api): State<Arc<FakeApi>>,
    method: Method,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    api.seen.lock().expect("seen").push((
        method.to_string(),
        format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"),
        content_type.clone(),
        parsed.clone(),
    ));
    if name != "sparkle-worker" {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("deployments.apps \"{name}\" not found"), "reason": "NotFound", "code": 404});
        return (StatusCode::NOT_FOUND, axum::Json(status));
    }
    if method == Method::PATCH {
        if content_type != "application/merge-patch+json" {
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, axum::Json(json!({})));
        }
        if let Some(n) = parsed["spec"]["replicas"].as_i64() {
            *api.replicas.lock().expect("replicas") = n;
        }
    }
    let n = *api.replicas.lock().expect("replicas");
    (StatusCode::OK, axum::Json(scale(&ns, &name, n)))
}

async fn serve(api: Arc<FakeApi>) -> String {
    let app = axum::Router::new()
        .route(
            "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
            get(scale_route).patch(scale_route),
        )
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn client(url: &str) -> kube::Client {
    let config = kube::Config::new(url.parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}

#[tokio::test]
async fn the_workers_deployment_is_scaled_up_and_down_through_its_scale_subresource() {
    let api = Arc::new(FakeApi::default());
    let url = serve(api.clone()).await;
    let mut workers = KubernetesDeployment::new(client(&url), Some("sparkle"), "sparkle-worker");
    assert_eq!(workers.current().await, 0);
    workers.scale_to(3).await.expect("up");
    assert_eq!(*api.replicas.lock().expect("replicas"), 3);
    assert_eq!(workers.current().await, 3);
    workers.scale_to(0).await.expect("down to zero");
    assert_eq!(workers.current().await, 0);
    workers.stop_all(Duration::from_secs(1)).await;
    let seen = api.seen.lock().expect("seen").clone();
    let patches: Vec<&Value> = seen
        .iter()
        .filter(|(m, _, _, _)| m == "PATCH")
        .map(|(_, _, _, body)| body)
        .collect();
    assert_eq!(
        patches,
        [
            &json!({"spec": {"replicas": 3}}),
            &json!({"spec": {"replicas": 0}})
        ],
        "merge patches of the replica count alone; stopping the scaler leaves the workers"
    );
    assert!(seen.iter().all(|(_, path, _, _)| path
        == "/apis/apps/v1/namespaces/sparkle/deployments/sparkle-worker/scale"));
}

#[tokio::test]
async fn a_missing_deployment_is_an_error_and_the_last_count_stands() {
    let api = Arc::new(FakeApi::default());
    let url = serve(api.clone()).await;
    let mut workers = KubernetesDeployment::new(client(&url), Some("sparkle"), "no-such");
    let err = workers.scale_to(2).await.expect_err("not found");
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(workers.current().await, 0);
}
