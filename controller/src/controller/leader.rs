//! One writer at a time: the controller replicas elect a leader on a
//! `coordination.k8s.io` Lease (server-side apply, so two replicas can never
//! both take it). Only the leader writes status and Events; the others
//! follow the same objects, ready to take over as soon as the lease runs out.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};

/// The Lease the replicas compete for, in the controller's namespace.
pub const LEASE_NAME: &str = "bulkhead-controller";
/// A leader that stops renewing is replaced this long after its last renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The leader renews this long before its lease would run out.
const RENEW_BEFORE: Duration = Duration::from_secs(5);

pub struct Leadership {
    leading: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

impl Leadership {
    /// Join the election as `identity` (the pod's name).
    pub async fn join(client: Client, namespace: &str, identity: &str) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(LEASE_DURATION.as_secs())
            .with_grace(RENEW_BEFORE.as_secs())
            .build()
            .await?;
        let (leading, task) = manager.watch().await;
        Ok(Self { leading, task })
    }

    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Wait until this replica gains or loses the lead; the new state.
    pub async fn changed(&mut self) -> bool {
        if self.leading.changed().await.is_err() {
            // The election task ended: no longer leading, and never again.
            std::future::pending::<()>().await;
        }
        self.is_leader()
    }

    /// Step down and free the Lease at once (on SIGTERM), so another replica
    /// need not wait for it to run out.
    pub async fn resign(self) {
        drop(self.leading);
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(_))) => tracing::info!("stepped down; the lease is free"),
            Ok(Ok(Err(error))) => tracing::warn!(%error, "releasing the lease failed; it runs out by itself"),
            Ok(Err(error)) => tracing::warn!(%error, "the election task failed"),
            Err(_) => tracing::warn!("releasing the lease timed out; it runs out by itself"),
        }
    }
}
