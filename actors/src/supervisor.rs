//! The root supervisor of a peer: starts its children and restarts any that fail, with backoff.
//!
//! ractor's default supervision stops the supervisor when a child dies; this one instead
//! schedules a restart after an exponential backoff (`loom_protocols::Backoff`). A child that ran
//! longer than `healthy_after` before dying starts over from the base delay. A child that keeps
//! dying without ever becoming healthy is given up on after `max_restarts` attempts, and the
//! supervisor stops, so the process exits instead of spinning.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use loom_protocols::Backoff;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

/// A future that spawns one child linked to the given supervisor.
pub type SpawnFuture = Pin<Box<dyn Future<Output = Result<ActorCell, String>> + Send>>;

/// How to (re)start one child.
#[derive(Clone)]
pub struct ChildSpec {
    /// Name of the child (also its registry name).
    pub name: String,
    /// Spawns the child linked to the supervisor passed in.
    pub spawn: Arc<dyn Fn(ActorCell) -> SpawnFuture + Send + Sync>,
}

impl ChildSpec {
    /// A child that is `actor` started with a clone of `args`, registered as `registry_name`.
    pub fn actor<A>(name: &str, registry_name: &'static str, actor: A, args: A::Arguments) -> Self
    where
        A: Actor + Clone + Sync,
        A::Arguments: Clone + Sync,
    {
        Self {
            name: name.to_owned(),
            spawn: Arc::new(move |supervisor| {
                let (actor, args) = (actor.clone(), args.clone());
                Box::pin(async move {
                    let (actor_ref, _) =
                        Actor::spawn_linked(Some(registry_name.into()), actor, args, supervisor)
                            .await
                            .map_err(|e| e.to_string())?;
                    Ok(actor_ref.get_cell())
                })
            }),
        }
    }
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .finish()
    }
}

/// Restart policy.
#[derive(Debug, Clone)]
pub struct SupervisorPolicy {
    /// First restart delay.
    pub base_delay: Duration,
    /// Longest restart delay.
    pub max_delay: Duration,
    /// A child that lived this long before failing is considered to have been healthy.
    pub healthy_after: Duration,
    /// Consecutive unhealthy restarts after which the supervisor gives up.
    pub max_restarts: u32,
}

impl Default for SupervisorPolicy {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            healthy_after: Duration::from_secs(30),
            max_restarts: 20,
        }
    }
}

/// One child as reported by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildStatus {
    /// Child name.
    pub name: String,
    /// Whether it is running now.
    pub running: bool,
    /// Restarts so far.
    pub restarts: u64,
}

/// Messages of the supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// (Re)start the named child now.
    Start(String),
    /// Report every child's status.
    Children(RpcReplyPort<Vec<ChildStatus>>),
}

struct Child {
    spec: ChildSpec,
    cell: Option<ActorCell>,
    started_at: Option<Instant>,
    backoff: Backoff,
    restarts: u64,
}

/// State of the supervisor.
pub struct SupervisorState {
    policy: SupervisorPolicy,
    children: BTreeMap<String, Child>,
}

/// The root supervisor actor.
#[derive(Debug, Default)]
pub struct PeerSupervisor;

impl Actor for PeerSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = (SupervisorPolicy, Vec<ChildSpec>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (policy, specs): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut children = BTreeMap::new();
        for spec in specs {
            // Children start in order; a child failing to start at boot is fatal.
            let cell = (spec.spawn)(myself.get_cell())
                .await
                .map_err(|e| format!("starting {}: {e}", spec.name))?;
            let backoff = Backoff::new(
                policy.base_delay.as_millis() as u64,
                policy.max_delay.as_millis() as u64,
            );
            children.insert(
                spec.name.clone(),
                Child {
                    spec,
                    cell: Some(cell),
                    started_at: Some(Instant::now()),
                    backoff,
                    restarts: 0,
                },
            );
        }
        Ok(SupervisorState { policy, children })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Start(name) => {
                let Some(child) = state.children.get_mut(&name) else {
                    return Ok(());
                };
                if child.cell.is_some() {
                    return Ok(());
                }
                match (child.spec.spawn)(myself.get_cell()).await {
                    Ok(cell) => {
                        tracing::info!(child = %name, restarts = child.restarts, "child restarted");
                        child.cell = Some(cell);
                        child.started_at = Some(Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(child = %name, error = %e, "restart failed");
                        schedule_restart(&myself, &name, child, &state.policy)?;
                    }
                }
            }
            SupervisorMsg::Children(reply) => {
                let list = state
                    .children
                    .iter()
                    .map(|(name, c)| ChildStatus {
                        name: name.clone(),
                        running: c.cell.is_some(),
                        restarts: c.restarts,
                    })
                    .collect();
                let _ = reply.send(list);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped: {}", reason.unwrap_or_default()))
            }
            _ => return Ok(()),
        };
        let id = cell.get_id();
        let Some((name, child)) = state
            .children
            .iter_mut()
            .find(|(_, c)| c.cell.as_ref().map(|c| c.get_id()) == Some(id))
        else {
            return Ok(());
        };
        let name = name.clone();
        tracing::warn!(child = %name, %why, "child exited");
        metrics::counter!("loom_actor_restarts_total", "actor" => name.clone()).increment(1);
        child.cell = None;
        if child
            .started_at
            .is_some_and(|t| t.elapsed() >= state.policy.healthy_after)
        {
            child.backoff.reset();
        }
        schedule_restart(&myself, &name, child, &state.policy)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Stop children in reverse start order.
        for child in state.children.values_mut().rev() {
            if let Some(cell) = child.cell.take() {
                cell.stop(Some("supervisor stopping".into()));
            }
        }
        Ok(())
    }
}

fn schedule_restart(
    myself: &ActorRef<SupervisorMsg>,
    name: &str,
    child: &mut Child,
    policy: &SupervisorPolicy,
) -> Result<(), ActorProcessingErr> {
    if child.backoff.attempt() >= policy.max_restarts {
        return Err(format!(
            "child {name} failed {} times in a row; giving up",
            policy.max_restarts
        )
        .into());
    }
    child.restarts += 1;
    let delay = Duration::from_millis(child.backoff.next_delay_ms(rand::random::<f64>()));
    let name = name.to_owned();
    myself.send_after(delay, move || SupervisorMsg::Start(name));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A child that fails on its first message, counting its starts.
    struct Flaky(Arc<AtomicUsize>);

    impl Actor for Flaky {
        type Msg = ();
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn handle(
            &self,
            _: ActorRef<()>,
            _: (),
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            Err("boom".into())
        }
    }

    fn flaky_spec(starts: Arc<AtomicUsize>) -> ChildSpec {
        ChildSpec {
            name: "flaky".into(),
            spawn: Arc::new(move |sup| {
                let starts = starts.clone();
                Box::pin(async move {
                    let (r, _) =
                        Actor::spawn_linked(Some("test.flaky".into()), Flaky(starts), (), sup)
                            .await
                            .map_err(|e| e.to_string())?;
                    Ok(r.get_cell())
                })
            }),
        }
    }

    async fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for condition");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_child_is_restarted_under_its_name() {
        let starts = Arc::new(AtomicUsize::new(0));
        let policy = SupervisorPolicy {
            base_delay: Duration::from_millis(10),
            ..SupervisorPolicy::default()
        };
        let (sup, handle) = Actor::spawn(
            None,
            PeerSupervisor,
            (policy, vec![flaky_spec(starts.clone())]),
        )
        .await
        .expect("supervisor starts");
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        for round in 1..=3 {
            let child: ActorRef<()> = ractor::registry::where_is("test.flaky")
                .expect("child registered")
                .into();
            child.cast(()).expect("cast");
            let s = starts.clone();
            wait_for(move || s.load(Ordering::SeqCst) == round + 1).await;
            let status = ractor::call_t!(sup, SupervisorMsg::Children, 1_000).expect("status");
            assert_eq!(status[0].restarts, round as u64);
            wait_for(|| ractor::registry::where_is("test.flaky").is_some()).await;
        }
        sup.stop(None);
        handle.await.ok();
    }

    #[tokio::test]
    async fn a_child_that_never_recovers_stops_the_supervisor() {
        let starts = Arc::new(AtomicUsize::new(0));
        let policy = SupervisorPolicy {
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            max_restarts: 2,
            ..SupervisorPolicy::default()
        };
        let spec = ChildSpec {
            name: "flaky2".into(),
            spawn: Arc::new({
                let starts = starts.clone();
                move |sup| {
                    let starts = starts.clone();
                    Box::pin(async move {
                        let (r, _) = Actor::spawn_linked(None, Flaky(starts), (), sup)
                            .await
                            .map_err(|e| e.to_string())?;
                        // Fail immediately.
                        r.cast(()).ok();
                        Ok(r.get_cell())
                    })
                }
            }),
        };
        let (_sup, handle) = Actor::spawn(None, PeerSupervisor, (policy, vec![spec]))
            .await
            .expect("supervisor starts");
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("supervisor gave up in time")
            .ok();
        assert_eq!(starts.load(Ordering::SeqCst), 3);
    }
}
