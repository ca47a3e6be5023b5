//! The job lifecycle as a pure state machine: no actix, no store, no clock.
//!
//! [`Jobs`] owns every unfinished job, the queue order, which node holds which lease and how many
//! unfinished jobs each client has. Every command (`submit`, `lease`, `report`, `requeue`,
//! `node_lost`, `reconcile`, `expire`, `cancel`) changes that state at once and answers the
//! [`Effect`]s to perform, in the order they must happen: for each job, the record that makes its
//! new state durable ([`Effect::Persist`], [`Effect::PersistFinished`]) comes before any message
//! about it leaves ([`Effect::Assign`], [`Effect::CancelOnNode`], [`Effect::Event`],
//! [`Effect::Ended`]). The [`ControlPlane`](super::ControlPlane) actor only carries the effects
//! out (see `control::effects`).
//!
//! A job's life: `queued → leased → running → succeeded | failed | cancelled`. The rules, held by
//! the property tests in `tests/`:
//! - a job holds at most one lease, and a node's lease set is exactly the jobs leased to it;
//! - a report (progress, result, failure) changes a job only when it names the job's current
//!   lease and comes from that lease's node (fencing); anything else changes nothing;
//! - a job never has more than `max_attempts` attempts;
//! - a finished (or cancelled) job is gone from the machine: nothing changes it again;
//! - the queue holds exactly the queued jobs; each client's count is its unfinished jobs;
//! - replaying the persisted records gives back the durable part of the state.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use drover_shared::ids::{JobId, LeaseId, NodeId};
use drover_shared::job::{JobSpec, JobTask, SourceSpec};

use super::router;
use crate::error::{CoordinatorError, Result};
use crate::records::{Attempt, JobRecord, JobState, Lease};

mod effects;
#[cfg(test)]
mod tests;

pub use effects::{
    Assignment, Effect, Effects, EndReason, Finished, Grant, Group, JobEvent, JobMetric, NodeReport,
};

/// A queued job's place: (`router::queue_key`, acceptance time, id).
type QueueEntry = (i64, u64, JobId);

fn queue_entry(job: &JobRecord) -> QueueEntry {
    (
        router::queue_key(job.spec.priority, job.created_ms),
        job.created_ms,
        job.id,
    )
}

/// The unfinished jobs and their lifecycle (see the module documentation).
#[derive(Debug)]
pub struct Jobs {
    /// Jobs not yet in a terminal state.
    active: HashMap<JobId, JobRecord>,
    /// The queued jobs in the order they are offered to nodes.
    queue: BTreeSet<QueueEntry>,
    /// The jobs leased to each node, with the lease group each runs in.
    leases: HashMap<NodeId, HashMap<JobId, u64>>,
    /// Unfinished jobs per client label.
    clients: HashMap<String, u32>,
    /// Attempts a job may make.
    max_attempts: u32,
}

impl Jobs {
    /// The machine holding `jobs` (unfinished jobs read back from the store), allowing
    /// `max_attempts` attempts per job.
    pub fn restore(jobs: impl IntoIterator<Item = JobRecord>, max_attempts: u32) -> Self {
        let mut machine = Self {
            active: HashMap::new(),
            queue: BTreeSet::new(),
            leases: HashMap::new(),
            clients: HashMap::new(),
            max_attempts: max_attempts.max(1),
        };
        for job in jobs {
            if job.state.is_terminal() {
                continue;
            }
            machine.admit(job);
        }
        machine
    }

    /// Takes in an unfinished job: queue, lease set, client count.
    fn admit(&mut self, job: JobRecord) {
        if job.state == JobState::Queued {
            self.queue.insert(queue_entry(&job));
        }
        if let Some(lease) = &job.lease {
            // Groups are not durable: a lease read back counts as a group of its own, which
            // over-counts the node's busy workers until those jobs end (never over-commits).
            self.leases
                .entry(lease.node_id)
                .or_default()
                .insert(job.id, Group::alone(lease.id).id);
        }
        if let Some(client) = &job.client {
            *self.clients.entry(client.clone()).or_default() += 1;
        }
        self.active.insert(job.id, job);
    }

    /// An unfinished job.
    pub fn get(&self, id: &JobId) -> Option<&JobRecord> {
        self.active.get(id)
    }

    /// Every unfinished job, in no order.
    pub fn iter(&self) -> impl Iterator<Item = &JobRecord> {
        self.active.values()
    }

    /// Unfinished jobs.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// Whether no job is unfinished.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Queued jobs.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The queued jobs in queue order, with what they ask for.
    pub fn queue(&self) -> impl Iterator<Item = (JobId, &JobSpec)> {
        self.queue
            .iter()
            .filter_map(|&(_, _, id)| self.active.get(&id).map(|job| (id, &job.spec)))
    }

    /// Jobs ahead of `id` in the queue order now (0 when it is not queued).
    pub fn queue_position(&self, id: JobId) -> usize {
        self.queue
            .iter()
            .position(|(_, _, queued)| *queued == id)
            .unwrap_or(0)
    }

    /// Leases `node` holds.
    pub fn leases_on(&self, node: NodeId) -> usize {
        self.leases.get(&node).map_or(0, HashMap::len)
    }

    /// Lease groups `node` holds: the workers its leases keep busy (see [`Group`]).
    pub fn groups_on(&self, node: NodeId) -> usize {
        self.leases.get(&node).map_or(0, |held| {
            let mut groups: Vec<u64> = held.values().copied().collect();
            groups.sort_unstable();
            groups.dedup();
            groups.len()
        })
    }

    /// Unfinished jobs of the client labelled `label`.
    pub fn client_active(&self, label: &str) -> u32 {
        self.clients.get(label).copied().unwrap_or(0)
    }

    /// Accepts new jobs (state `queued`, no attempts), all or none: refused when the queue would
    /// pass `queue_limit` or their client would pass `client_cap` unfinished jobs (0: no cap).
    pub fn submit(
        &mut self,
        jobs: Vec<JobRecord>,
        queue_limit: usize,
        client_cap: u32,
    ) -> Result<Effects> {
        if self.queue.len() + jobs.len() > queue_limit {
            return Err(CoordinatorError::QueueFull {
                limit: queue_limit,
                retry_after_s: 5,
            });
        }
        if let Some(label) = jobs.first().and_then(|j| j.client.as_deref()) {
            let active = self.client_active(label);
            if client_cap > 0 && active as usize + jobs.len() > client_cap as usize {
                return Err(CoordinatorError::RateLimited {
                    message: format!(
                        "client {label} has {active} unfinished jobs and its limit is {client_cap}"
                    ),
                    retry_after_s: 5,
                });
            }
        }
        let mut out = Effects::with_capacity(jobs.len() * 2);
        for mut job in jobs {
            job.state = JobState::Queued;
            job.lease = None;
            job.attempts.clear();
            out.push(Effect::Metric(JobMetric::Accepted));
            out.push(Effect::Persist(job.clone()));
            self.admit(job);
        }
        Ok(out)
    }

    /// Leases queued job `job_id` as `grant` says. Anything but a queued job is left alone.
    pub fn lease(&mut self, job_id: JobId, grant: Grant, now_ms: u64) -> Effects {
        let Some(job) = self.active.get_mut(&job_id) else {
            return Effects::new();
        };
        if job.state != JobState::Queued || counted_attempts(job) >= self.max_attempts {
            return Effects::new();
        }
        let mut out = Effects::with_capacity(5);
        if job.attempts.is_empty() {
            out.push(Effect::Metric(JobMetric::QueueWait(
                now_ms.saturating_sub(job.created_ms) as f64 / 1000.0,
            )));
        }
        self.queue.remove(&queue_entry(job));
        let lease = Lease {
            id: grant.lease_id,
            node_id: grant.node_id,
            attempt: job.attempts.len() as u32 + 1,
            granted_ms: now_ms,
            deadline_ms: grant.deadline_ms,
        };
        job.state = JobState::Leased;
        job.size = Some(grant.size);
        job.updated_ms = now_ms;
        job.progress = None;
        job.lease = Some(lease.clone());
        self.leases
            .entry(grant.node_id)
            .or_default()
            .insert(job_id, grant.group.id);
        tracing::info!(job_id = %job_id, node_id = %grant.node_id, lease_id = %lease.id, attempt = lease.attempt, trace_id = job.trace_id.as_deref().unwrap_or(""), "job leased");
        out.push(Effect::Persist(job.clone()));
        out.push(Effect::Reindex(grant.node_id));
        out.push(Effect::Assign(Assignment {
            node_id: grant.node_id,
            job_id,
            lease_id: lease.id,
            attempt: lease.attempt,
            spec: JobSpec {
                steps: grant.steps,
                guidance_scale: grant.guidance_scale,
                ..job.spec.clone()
            },
            size: grant.size,
            deadline_ms: lease.deadline_ms,
            trace_id: job.trace_id.clone(),
            group: grant.group,
            model_id: String::new(),
        }));
        out.push(Effect::Event {
            job_id,
            event: JobEvent::Assigned {
                node_id: grant.node_id,
                attempt: lease.attempt,
            },
        });
        out
    }

    /// The job a report from `node` is about, when the report carries the job's current lease
    /// and `node` holds it (fencing); `None` (logged) otherwise.
    fn fenced(&mut self, node: NodeId, job_id: JobId, lease_id: LeaseId) -> Option<&mut JobRecord> {
        let job = self.active.get_mut(&job_id);
        match job {
            Some(job)
                if job
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.id == lease_id && l.node_id == node) =>
            {
                Some(job)
            }
            _ => {
                tracing::info!(job_id = %job_id, lease_id = %lease_id, node_id = %node, "stale report dropped");
                None
            }
        }
    }

    /// What `node` reported about a job. Reports that do not carry the job's current lease held
    /// by `node` change nothing.
    pub fn report(&mut self, node: NodeId, report: NodeReport, now_ms: u64) -> Effects {
        let (job_id, lease_id) = report.lease();
        let Some(job) = self.fenced(node, job_id, lease_id) else {
            return Effects::new();
        };
        let mut out = Effects::new();
        match report {
            NodeReport::Progress { step, total, .. } => {
                // Progress is not persisted: it is frequent and cheap to lose.
                job.state = JobState::Running;
                job.progress = Some((step, total));
                job.updated_ms = now_ms;
                out.push(Effect::Event {
                    job_id,
                    event: JobEvent::Progress { step, total },
                });
            }
            NodeReport::Succeeded {
                png,
                elapsed_ms,
                upscaled,
                batch_size,
                ..
            } => {
                job.batch_size = Some(batch_size);
                out.push(Effect::Metric(JobMetric::Batch {
                    node_id: node,
                    size: batch_size,
                }));
                if let Some((_, total)) = job.progress {
                    job.progress = Some((total, total));
                }
                // The steps the node ran are its progress reports' total (the model's default
                // when the job named none); speed counts model calls (a Heun step is two).
                let steps = job.progress.map_or(job.spec.steps, |(_, total)| total);
                let steps = job.spec.model_calls_with(None, steps);
                // A stand-alone upscale runs no diffusion steps: it says nothing of the speed.
                let work = if job.spec.task == drover_shared::job::JobTask::Upscale {
                    0.0
                } else {
                    job.size.map_or(0, |s| s.pixels()) as f64 * f64::from(steps)
                };
                if work > 0.0 {
                    out.push(Effect::Measured {
                        node_id: node,
                        pixel_steps_per_second: work * 1000.0 / elapsed_ms.max(1) as f64,
                        batch_size,
                    });
                }
                let follow_up =
                    job.spec.task == JobTask::Generate && job.spec.upscale.is_some() && !upscaled;
                if follow_up {
                    self.hand_off(job_id, node, png, now_ms, &mut out);
                    return out;
                }
                tracing::info!(job_id = %job_id, node_id = %node, elapsed_ms, bytes = png.len(), "job succeeded");
                self.finish(
                    job_id,
                    JobState::Succeeded,
                    None,
                    Some(png),
                    now_ms,
                    &mut out,
                );
            }
            NodeReport::Failed {
                reason, permanent, ..
            } => {
                let reason = EndReason::NodeReported(reason);
                if permanent {
                    self.finish(
                        job_id,
                        JobState::Failed,
                        Some(reason.to_string()),
                        None,
                        now_ms,
                        &mut out,
                    );
                } else {
                    self.requeue_into(job_id, &reason, now_ms, &mut out);
                }
            }
        }
        out
    }

    /// A job rendered by `node` without its upscale (the node has no such upscaler): it goes
    /// back to the queue as the upscale of that render ([`JobTask::Upscale`], the render its
    /// source), for a node that holds the upscaler; its id, waiters and attempts stay. A
    /// result that is not a PNG fails the job.
    fn hand_off(
        &mut self,
        job_id: JobId,
        node: NodeId,
        png: Arc<[u8]>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let Some(source) = SourceSpec::rendered(png) else {
            let error = "the node's result is not a PNG".to_string();
            self.finish(job_id, JobState::Failed, Some(error), None, now_ms, out);
            return;
        };
        let Some(job) = self.active.get_mut(&job_id) else {
            return;
        };
        let outcome = "rendered; the upscale follows on a node with the upscaler".to_string();
        end_attempt(&mut self.leases, job, outcome, now_ms, out);
        job.spec.size = Some(drover_shared::job::Size {
            width: source.width,
            height: source.height,
        });
        job.spec.source = Some(Box::new(source));
        job.spec.task = JobTask::Upscale;
        job.size = None;
        job.progress = None;
        job.state = JobState::Queued;
        job.updated_ms = now_ms;
        self.queue.insert(queue_entry(job));
        tracing::info!(job_id = %job_id, node_id = %node, "job rendered; its upscale is queued for another node");
        out.push(Effect::Persist(job.clone()));
        out.push(Effect::Event {
            job_id,
            event: JobEvent::Requeued {
                reason: "rendered; the upscale follows on a node with the upscaler".into(),
            },
        });
    }

    /// Ends the current attempt of leased job `job_id` for `reason`: the job is queued again, or
    /// fails when it has used every attempt. A job without a lease is left alone.
    pub fn requeue(&mut self, job_id: JobId, reason: &EndReason, now_ms: u64) -> Effects {
        let mut out = Effects::new();
        self.requeue_into(job_id, reason, now_ms, &mut out);
        out
    }

    fn requeue_into(&mut self, job_id: JobId, reason: &EndReason, now_ms: u64, out: &mut Effects) {
        let Some(job) = self.active.get_mut(&job_id) else {
            return;
        };
        if job.lease.is_none() {
            return;
        }
        end_attempt(&mut self.leases, job, reason.to_string(), now_ms, out);
        if let Some(last) = job.attempts.last_mut() {
            last.counted = reason.counts();
        }
        out.push(Effect::Metric(JobMetric::Requeued(reason.label())));
        job.updated_ms = now_ms;
        job.progress = None;
        let counted = counted_attempts(job);
        if counted >= self.max_attempts {
            let reasons: Vec<_> = job.attempts.iter().map(|a| a.outcome.as_str()).collect();
            let error = format!("failed after {counted} attempts: {}", reasons.join("; "));
            tracing::warn!(job_id = %job_id, %error, "job failed");
            self.finish(job_id, JobState::Failed, Some(error), None, now_ms, out);
        } else {
            job.state = JobState::Queued;
            self.queue.insert(queue_entry(job));
            tracing::info!(job_id = %job_id, reason = %reason, "job re-queued");
            out.push(Effect::Persist(job.clone()));
            out.push(Effect::Event {
                job_id,
                event: JobEvent::Requeued {
                    reason: reason.to_string(),
                },
            });
        }
    }

    /// `node` went offline: every lease it holds ends ([`EndReason::NodeOffline`]).
    pub fn node_lost(&mut self, node: NodeId, now_ms: u64) -> Effects {
        let mut held: Vec<JobId> = self
            .leases
            .get(&node)
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default();
        held.sort_unstable();
        let mut out = Effects::new();
        for job_id in held {
            self.requeue_into(job_id, &EndReason::NodeOffline, now_ms, &mut out);
        }
        out
    }

    /// `node` opened a session saying it still runs `running` (job, lease) pairs: every lease it
    /// holds that it did not list ends ([`EndReason::NodeRestarted`]).
    pub fn reconcile(
        &mut self,
        node: NodeId,
        running: &[(JobId, LeaseId)],
        fresh: bool,
        now_ms: u64,
    ) -> Effects {
        let reason = if fresh {
            EndReason::NodeRestarted
        } else {
            EndReason::AssignmentLost
        };
        let still: HashSet<&(JobId, LeaseId)> = running.iter().collect();
        let mut dropped: Vec<JobId> = self
            .leases
            .get(&node)
            .into_iter()
            .flat_map(HashMap::keys)
            .filter(|id| {
                self.active
                    .get(id)
                    .and_then(|j| j.lease.as_ref())
                    .is_none_or(|l| !still.contains(&(**id, l.id)))
            })
            .copied()
            .collect();
        dropped.sort_unstable();
        let mut out = Effects::new();
        for job_id in dropped {
            self.requeue_into(job_id, &reason, now_ms, &mut out);
        }
        out
    }

    /// Leases held by nodes that `registered` does not know end
    /// ([`EndReason::NodeUnregistered`]).
    pub fn drop_orphans(&mut self, registered: impl Fn(NodeId) -> bool, now_ms: u64) -> Effects {
        let mut orphans: Vec<JobId> = self
            .leases
            .iter()
            .filter(|(node, _)| !registered(**node))
            .flat_map(|(_, jobs)| jobs.keys().copied())
            .collect();
        orphans.sort_unstable();
        let mut out = Effects::new();
        for job_id in orphans {
            self.requeue_into(job_id, &EndReason::NodeUnregistered, now_ms, &mut out);
        }
        out
    }

    /// Time passed: queued jobs older than `queue_expiry_s` fail, and leases past their deadline
    /// end ([`EndReason::LeaseExpired`], and their node is asked to stop).
    pub fn expire(&mut self, now_ms: u64, queue_expiry_s: u64) -> Effects {
        let mut out = Effects::new();
        // Jobs that waited too long first (a job re-queued below is looked at on the next tick).
        let expiry_ms = queue_expiry_s.saturating_mul(1000);
        let mut stale: Vec<JobId> = self
            .active
            .values()
            .filter(|j| {
                j.state == JobState::Queued && now_ms.saturating_sub(j.created_ms) > expiry_ms
            })
            .map(|j| j.id)
            .collect();
        stale.sort_unstable();
        for job_id in stale {
            let error = format!("expired after waiting {queue_expiry_s} s for a free node");
            self.finish(
                job_id,
                JobState::Failed,
                Some(error),
                None,
                now_ms,
                &mut out,
            );
        }
        let mut expired: Vec<(JobId, NodeId, LeaseId)> = self
            .active
            .values()
            .filter_map(|j| {
                let lease = j.lease.as_ref()?;
                (lease.deadline_ms < now_ms).then_some((j.id, lease.node_id, lease.id))
            })
            .collect();
        expired.sort_unstable();
        for (job_id, node_id, lease_id) in expired {
            out.push(Effect::Metric(JobMetric::LeaseExpired));
            self.requeue_into(job_id, &EndReason::LeaseExpired, now_ms, &mut out);
            out.push(Effect::CancelOnNode {
                node_id,
                job_id,
                lease_id,
            });
        }
        out
    }

    /// Cancels unfinished job `job_id`: it ends as cancelled at once and its node, if it holds a
    /// lease, is asked to stop (a late result is fenced off). `None` when the job is not
    /// unfinished.
    pub fn cancel(&mut self, job_id: JobId, now_ms: u64) -> Option<Effects> {
        self.active.get(&job_id)?;
        let mut out = Effects::new();
        let error = "cancelled by a client".to_string();
        self.stop(job_id, JobState::Cancelled, error, now_ms, &mut out);
        tracing::info!(job_id = %job_id, "job cancelled");
        Some(out)
    }

    /// Takes back jobs whose acceptance could not be made durable (their submitter was refused):
    /// each unfinished one fails with `reason`, and a node holding one is asked to stop, so a
    /// refused job never runs.
    pub fn revoke(&mut self, ids: &[JobId], reason: &str, now_ms: u64) -> Effects {
        let mut out = Effects::new();
        for &job_id in ids {
            if self.active.contains_key(&job_id) {
                let error = format!("not accepted: {reason}");
                self.stop(job_id, JobState::Failed, error, now_ms, &mut out);
                tracing::warn!(job_id = %job_id, reason, "job revoked: its acceptance was not stored");
            }
        }
        out
    }

    /// Ends unfinished job `job_id` in `state` from outside (no node reported it): finished as
    /// [`Jobs::finish`] does, then the node holding its lease, if any, is asked to stop.
    fn stop(
        &mut self,
        job_id: JobId,
        state: JobState,
        error: String,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let lease = self.active.get(&job_id).and_then(|j| j.lease.clone());
        self.finish(job_id, state, Some(error), None, now_ms, out);
        if let Some(lease) = lease {
            out.push(Effect::CancelOnNode {
                node_id: lease.node_id,
                job_id,
                lease_id: lease.id,
            });
        }
    }

    /// Moves a job to terminal `state`: it leaves the machine, its end is persisted, then its
    /// waiters and watchers hear of it.
    fn finish(
        &mut self,
        job_id: JobId,
        state: JobState,
        error: Option<String>,
        png: Option<Arc<[u8]>>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let Some(mut job) = self.active.remove(&job_id) else {
            return;
        };
        if let Some(client) = &job.client
            && let Some(n) = self.clients.get_mut(client)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.clients.remove(client);
            }
        }
        self.queue.remove(&queue_entry(&job));
        let outcome = match state {
            JobState::Succeeded => "succeeded".to_string(),
            _ => error.clone().unwrap_or_else(|| state.as_str().to_string()),
        };
        let attempt_started = job.lease.as_ref().map(|l| l.granted_ms);
        let node_id = end_attempt(&mut self.leases, &mut job, outcome, now_ms, out);
        let secs = |from: u64| now_ms.saturating_sub(from) as f64 / 1000.0;
        let succeeded = state == JobState::Succeeded;
        if succeeded {
            job.node_id = node_id;
        }
        out.push(Effect::Metric(JobMetric::Finished {
            state,
            end_to_end_s: succeeded.then(|| secs(job.created_ms)),
            run_s: attempt_started.filter(|_| succeeded).map(secs),
        }));
        job.state = state;
        job.error = error;
        job.updated_ms = now_ms;
        // A finished job needs its source no more: its record keeps the sizes, not the bytes
        // (up to 16 MiB each, kept until retention otherwise).
        if let Some(source) = job.spec.source.as_mut() {
            **source = source.stripped();
        }
        out.push(Effect::PersistFinished {
            job: job.clone(),
            png: png.clone(),
        });
        out.push(Effect::Ended(Finished { job, png }));
    }
}

/// Ends the job's current lease (if any) with `outcome`: the node's lease set loses it, the
/// attempt is recorded. Answers the node that held the lease.
/// The attempts that count against `max_attempts` (not those whose assignment was lost).
fn counted_attempts(job: &JobRecord) -> u32 {
    job.attempts.iter().filter(|a| a.counted).count() as u32
}

fn end_attempt(
    leases: &mut HashMap<NodeId, HashMap<JobId, u64>>,
    job: &mut JobRecord,
    outcome: String,
    now_ms: u64,
    out: &mut Effects,
) -> Option<NodeId> {
    let lease = job.lease.take()?;
    if let Some(held) = leases.get_mut(&lease.node_id) {
        held.remove(&job.id);
        if held.is_empty() {
            leases.remove(&lease.node_id);
        }
    }
    out.push(Effect::Reindex(lease.node_id));
    job.attempts.push(Attempt {
        node_id: lease.node_id,
        lease_id: lease.id,
        started_ms: lease.granted_ms,
        ended_ms: now_ms,
        outcome,
        counted: true,
    });
    Some(lease.node_id)
}
