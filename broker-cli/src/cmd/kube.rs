//! The pod's role label on Kubernetes, so that a Service can route to the active broker
//! only (the Helm chart's `ha` profile selects `broker.io/role: active`): a broker on
//! PostgreSQL labels its own pod `standby` while it waits for the database's active lock
//! and `active` once it holds it.
//!
//! Off unless `BROKER_K8S_ROLE_LABEL` names the label. The pod is
//! `BROKER_K8S_POD_NAME` (the chart sets it from the downward API) in the namespace of
//! the pod's service account; the request is a JSON merge patch of the pod, with the
//! service account's token (read again for every request: kubelet rotates it) and CA.
//! `BROKER_K8S_API` and `BROKER_K8S_SA_DIR` override the API address and the service
//! account directory (tests use them).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

/// Where Kubernetes mounts the service account.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Between attempts while the API refuses or is away.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Sets this pod's role label.
pub struct RoleLabel {
    http: reqwest::Client,
    pod_url: String,
    sa_dir: PathBuf,
    label: String,
}

impl RoleLabel {
    /// From the environment; `None` when `BROKER_K8S_ROLE_LABEL` is unset or empty.
    pub fn from_env() -> anyhow::Result<Option<Arc<Self>>> {
        let label = match std::env::var("BROKER_K8S_ROLE_LABEL") {
            Ok(l) if !l.is_empty() => l,
            _ => return Ok(None),
        };
        let pod = std::env::var("BROKER_K8S_POD_NAME")
            .context("BROKER_K8S_ROLE_LABEL needs BROKER_K8S_POD_NAME (the pod's name)")?;
        let sa_dir = PathBuf::from(std::env::var("BROKER_K8S_SA_DIR").unwrap_or(SA_DIR.into()));
        let namespace = std::fs::read_to_string(sa_dir.join("namespace"))
            .with_context(|| format!("reading {}/namespace", sa_dir.display()))?;
        let api = match std::env::var("BROKER_K8S_API") {
            Ok(a) => a,
            Err(_) => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST")
                    .context("not in a Kubernetes pod: KUBERNETES_SERVICE_HOST is unset")?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or("443".into());
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("https://{host}:{port}")
            }
        };
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(5));
        let ca = sa_dir.join("ca.crt");
        if ca.exists() {
            let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
            http = http.add_root_certificate(
                reqwest::Certificate::from_pem(&pem).context("the service account's CA")?,
            );
        }
        Ok(Some(Arc::new(RoleLabel {
            http: http.build()?,
            pod_url: format!(
                "{}/api/v1/namespaces/{}/pods/{pod}",
                api.trim_end_matches('/'),
                namespace.trim()
            ),
            sa_dir,
            label,
        })))
    }

    /// Sets the label to `role` once.
    pub async fn set(&self, role: &str) -> anyhow::Result<()> {
        let token = std::fs::read_to_string(self.sa_dir.join("token"))
            .context("reading the service account token")?;
        let patch = serde_json::json!({"metadata": {"labels": {&self.label: role}}});
        let res = self
            .http
            .patch(&self.pod_url)
            .bearer_auth(token.trim())
            .header("content-type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .await
            .with_context(|| format!("PATCH {}", self.pod_url))?;
        let status = res.status();
        if !status.is_success() {
            let body = res.text().await.unwrap_or_default();
            bail!(
                "PATCH {}: {status}: {}",
                self.pod_url,
                body.chars().take(300).collect::<String>()
            );
        }
        Ok(())
    }

    /// Sets the label to `role` in the background, retrying until it is set. The handle
    /// lets the caller abort it when the role changes again.
    pub fn spawn_set(self: &Arc<Self>, role: &'static str) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        actix_web::rt::spawn(async move {
            loop {
                match this.set(role).await {
                    Ok(()) => {
                        tracing::info!(label = %this.label, role, "pod labelled");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), role, "cannot label the pod; retrying")
                    }
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
        })
    }
}
