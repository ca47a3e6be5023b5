//! Property tests of the job lifecycle: random sequences of commands (submissions, leases,
//! reports with current, stale and foreign leases, node losses, reconnects, time, cancels)
//! against the rules of the module documentation, checked after every command.

use std::collections::{HashMap, HashSet};

use drover_shared::job::{JobRequest, Size};
use proptest::prelude::*;

use super::*;

const NODES: usize = 3;
const MAX_ATTEMPTS: u32 = 3;
const QUEUE_LIMIT: usize = 8;
const CLIENT_CAP: u32 = 6;
const QUEUE_EXPIRY_S: u64 = 20;

fn node(i: usize) -> NodeId {
    NodeId::from_bytes([i as u8 + 1; 16])
}

/// A job; those of odd priority ask for an upscale (rendered by nodes that may lack it).
fn spec(priority: i32) -> JobSpec {
    let upscale = if priority % 2 != 0 {
        r#","upscale":{}"#
    } else {
        ""
    };
    let body =
        format!(r#"{{"prompt":"x","size":"64x64","steps":2,"priority":{priority}{upscale}}}"#);
    JobRequest::from_json(body.as_bytes())
        .and_then(|r| r.validate(|| 1))
        .expect("a valid job")
}

/// Which lease a report carries.
#[derive(Clone, Copy, Debug)]
enum Carries {
    /// The job's current lease, from its node.
    Current,
    /// The job's current lease, from another node.
    OtherNode,
    /// A lease the job held before.
    Stale,
    /// A lease nobody ever held.
    Unknown,
}

#[derive(Clone, Debug)]
enum Command {
    Submit {
        n: usize,
        client: u8,
        priority: i32,
    },
    Lease {
        job: usize,
        node: usize,
        /// 0: a job leased alone; else the lease group it joins on that node.
        group: u8,
    },
    Progress {
        job: usize,
        carries: Carries,
    },
    Succeed {
        job: usize,
        carries: Carries,
        /// The node ran the job's upscale.
        upscaled: bool,
        /// The result is a PNG.
        png: bool,
    },
    Fail {
        job: usize,
        carries: Carries,
        permanent: bool,
    },
    NodeLost {
        node: usize,
    },
    Reconcile {
        node: usize,
        keep: u8,
        /// The node process restarted (its first session) rather than reconnected.
        fresh: bool,
    },
    Advance {
        ms: u64,
    },
    Cancel {
        job: usize,
    },
    Unregister {
        node: usize,
    },
    Revoke {
        job: usize,
    },
}

fn carries() -> impl Strategy<Value = Carries> {
    prop_oneof![
        3 => Just(Carries::Current),
        1 => Just(Carries::OtherNode),
        1 => Just(Carries::Stale),
        1 => Just(Carries::Unknown),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (1..4usize, 0..2u8, -2..3i32).prop_map(|(n, client, priority)| Command::Submit { n, client, priority }),
        5 => (any::<usize>(), 0..NODES, 0..3u8).prop_map(|(job, node, group)| Command::Lease { job, node, group }),
        2 => (any::<usize>(), carries()).prop_map(|(job, carries)| Command::Progress { job, carries }),
        3 => (any::<usize>(), carries(), any::<bool>(), prop::bool::weighted(0.9)).prop_map(|(job, carries, upscaled, png)| Command::Succeed { job, carries, upscaled, png }),
        2 => (any::<usize>(), carries(), any::<bool>()).prop_map(|(job, carries, permanent)| Command::Fail { job, carries, permanent }),
        1 => (0..NODES).prop_map(|node| Command::NodeLost { node }),
        1 => (0..NODES, any::<u8>(), any::<bool>()).prop_map(|(node, keep, fresh)| Command::Reconcile { node, keep, fresh }),
        2 => (0..15_000u64).prop_map(|ms| Command::Advance { ms }),
        1 => any::<usize>().prop_map(|job| Command::Cancel { job }),
        1 => (0..NODES).prop_map(|node| Command::Unregister { node }),
        1 => any::<usize>().prop_map(|job| Command::Revoke { job }),
    ]
}

/// The durable part of a job: what a restart reads back (progress and `running` are not
/// persisted, and neither is the time of the last progress report).
fn durable(job: &JobRecord) -> JobRecord {
    let mut job = job.clone();
    if job.state == JobState::Running {
        job.state = JobState::Leased;
    }
    job.progress = None;
    job.updated_ms = 0;
    job
}

/// The world around the machine: the clock, the ids handed out, the persisted records and what
/// each job's leases were.
struct World {
    jobs: Jobs,
    now: u64,
    ids: Vec<JobId>,
    next_lease: u128,
    /// The last persisted record of every job (the log, replayed).
    disk: HashMap<JobId, JobRecord>,
    /// Every lease each job held, oldest first.
    held: HashMap<JobId, Vec<(NodeId, LeaseId)>>,
    /// Jobs that ended.
    ended: HashSet<JobId>,
    /// The lease group of each job's last lease.
    group_of: HashMap<JobId, u64>,
}

impl World {
    fn new() -> Self {
        Self {
            jobs: Jobs::restore(Vec::new(), MAX_ATTEMPTS),
            now: 1_000_000,
            ids: Vec::new(),
            next_lease: 1,
            disk: HashMap::new(),
            held: HashMap::new(),
            ended: HashSet::new(),
            group_of: HashMap::new(),
        }
    }

    fn pick(&self, i: usize) -> Option<JobId> {
        (!self.ids.is_empty()).then(|| self.ids[i % self.ids.len()])
    }

    /// The (node, lease) a report about `job_id` carries.
    fn carried(&mut self, job_id: JobId, carries: Carries) -> (NodeId, LeaseId) {
        let current = self
            .jobs
            .get(&job_id)
            .and_then(|j| j.lease.as_ref())
            .map(|l| (l.node_id, l.id));
        let unknown = |w: &mut Self| {
            w.next_lease += 1;
            (
                node(0),
                LeaseId::from_bytes((u128::MAX - w.next_lease).to_be_bytes()),
            )
        };
        match (carries, current) {
            (Carries::Current, Some(c)) => c,
            (Carries::OtherNode, Some((n, l))) => {
                let other = (0..NODES).map(node).find(|m| *m != n).unwrap_or(n);
                (other, l)
            }
            (Carries::Stale, _) => match self.held.get(&job_id).and_then(|h| {
                h.iter()
                    .rev()
                    .find(|(n, l)| current != Some((*n, *l)))
                    .copied()
            }) {
                Some(old) => old,
                None => unknown(self),
            },
            _ => unknown(self),
        }
    }

    /// Runs one command and checks the rules after it; answers its effects and whether it was
    /// a report the machine had to drop.
    fn step(&mut self, command: &Command) -> (Effects, bool) {
        let before: HashMap<JobId, JobRecord> =
            self.jobs.iter().map(|j| (j.id, j.clone())).collect();
        let (effects, fenced) = self.run(command);
        check(self, &before, &effects, fenced);
        (effects, fenced)
    }

    /// Runs one command; answers its effects and whether it was a report the machine must
    /// drop (a lease that is not the job's current one, or from another node).
    fn run(&mut self, command: &Command) -> (Effects, bool) {
        let now = self.now;
        let mut fenced = false;
        let report = |w: &mut Self,
                      job: usize,
                      carries: Carries,
                      make: &dyn Fn(JobId, LeaseId) -> NodeReport,
                      fenced: &mut bool| {
            let Some(job_id) = w.pick(job) else {
                return Effects::new();
            };
            let (n, lease) = w.carried(job_id, carries);
            let current = w
                .jobs
                .get(&job_id)
                .and_then(|j| j.lease.as_ref())
                .map(|l| (l.node_id, l.id));
            *fenced = current != Some((n, lease));
            w.jobs.report(n, make(job_id, lease), now)
        };
        let effects = match command {
            Command::Submit {
                n,
                client,
                priority,
            } => {
                let jobs: Vec<JobRecord> = (0..*n)
                    .map(|_| {
                        self.now += 1;
                        let id = JobId::from_bytes(
                            (u128::from(self.now) << 64 | self.ids.len() as u128).to_be_bytes(),
                        );
                        let mut job = JobRecord::new(id, spec(*priority));
                        job.created_ms = self.now;
                        job.updated_ms = self.now;
                        job.client = Some(format!("client-{client}"));
                        job
                    })
                    .collect();
                let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
                match self.jobs.submit(jobs, QUEUE_LIMIT, CLIENT_CAP) {
                    Ok(effects) => {
                        self.ids.extend(ids);
                        effects
                    }
                    Err(_) => Effects::new(),
                }
            }
            Command::Lease {
                job,
                node: n,
                group,
            } => {
                let Some(job_id) = self.pick(*job) else {
                    return (Effects::new(), false);
                };
                self.next_lease += 1;
                let lease_id = LeaseId::from_bytes(self.next_lease.to_be_bytes());
                let group = match group {
                    0 => Group::alone(lease_id),
                    g => Group {
                        id: u64::from(*g),
                        size: 2,
                    },
                };
                let grant = Grant {
                    node_id: node(*n),
                    lease_id,
                    size: Size {
                        width: 64,
                        height: 64,
                    },
                    steps: 4,
                    guidance_scale: 7.0,
                    deadline_ms: now + 10_000,
                    group,
                };
                let was_queued = self
                    .jobs
                    .get(&job_id)
                    .is_some_and(|j| j.state == JobState::Queued);
                let effects = self.jobs.lease(job_id, grant, now);
                let leased = self
                    .jobs
                    .get(&job_id)
                    .and_then(|j| j.lease.as_ref())
                    .is_some_and(|l| l.id == lease_id);
                if leased {
                    self.group_of.insert(job_id, group.id);
                }
                if was_queued {
                    self.held
                        .entry(job_id)
                        .or_default()
                        .push((grant.node_id, grant.lease_id));
                } else {
                    assert!(effects.is_empty(), "only a queued job can be leased");
                }
                effects
            }
            Command::Progress { job, carries } => report(
                self,
                *job,
                *carries,
                &|job_id, lease_id| NodeReport::Progress {
                    job_id,
                    lease_id,
                    step: 1,
                    total: 2,
                },
                &mut fenced,
            ),
            Command::Succeed {
                job,
                carries,
                upscaled,
                png,
            } => {
                let was = self.pick(*job).and_then(|id| self.jobs.get(&id).cloned());
                let effects = report(
                    self,
                    *job,
                    *carries,
                    &|job_id, lease_id| NodeReport::Succeeded {
                        job_id,
                        upscaled: *upscaled,
                        batch_size: 1,
                        lease_id,
                        png: if *png {
                            png_header(64, 64)
                        } else {
                            Arc::from(vec![1u8, 2, 3])
                        },
                        elapsed_ms: 40,
                    },
                    &mut fenced,
                );
                if let (false, Some(was)) = (fenced, was) {
                    // A render that skipped its upscale goes back to the queue as the upscale
                    // (one attempt more); every other success, or a result that is no PNG,
                    // ends the job.
                    let now = self.jobs.get(&was.id);
                    let follows = was.spec.task == JobTask::Generate
                        && was.spec.upscale.is_some()
                        && !*upscaled;
                    if follows && *png {
                        let job = now.expect("handed off, not ended");
                        assert_eq!(job.state, JobState::Queued);
                        assert_eq!(job.spec.task, JobTask::Upscale);
                        assert_eq!(job.attempts.len(), was.attempts.len() + 1);
                        assert_eq!(job.spec.source.as_ref().map(|s| s.width), Some(64));
                    } else {
                        assert!(now.is_none(), "a success ended the job");
                    }
                }
                effects
            }
            Command::Fail {
                job,
                carries,
                permanent,
            } => {
                let permanent = *permanent;
                report(
                    self,
                    *job,
                    *carries,
                    &move |job_id, lease_id| NodeReport::Failed {
                        job_id,
                        lease_id,
                        reason: "out of memory".into(),
                        permanent,
                    },
                    &mut fenced,
                )
            }
            Command::NodeLost { node: n } => self.jobs.node_lost(node(*n), now),
            Command::Reconcile {
                node: n,
                keep,
                fresh,
            } => {
                let listed: Vec<(JobId, LeaseId)> = self
                    .jobs
                    .iter()
                    .filter_map(|j| j.lease.as_ref().map(|l| (j.id, l)))
                    .filter(|(_, l)| l.node_id == node(*n))
                    .enumerate()
                    .filter(|(i, _)| keep & (1 << (i % 8)) != 0)
                    .map(|(_, (id, l))| (id, l.id))
                    .collect();
                self.jobs.reconcile(node(*n), &listed, *fresh, now)
            }
            Command::Advance { ms } => {
                self.now += ms;
                self.jobs.expire(self.now, QUEUE_EXPIRY_S)
            }
            Command::Cancel { job } => match self.pick(*job) {
                Some(job_id) => {
                    let active = self.jobs.get(&job_id).is_some();
                    let effects = self.jobs.cancel(job_id, now);
                    assert_eq!(
                        effects.is_some(),
                        active,
                        "cancel answers for unfinished jobs only"
                    );
                    effects.unwrap_or_default()
                }
                None => Effects::new(),
            },
            Command::Revoke { job } => match self.pick(*job) {
                Some(job_id) => self.jobs.revoke(&[job_id], "the disk is full", now),
                None => Effects::new(),
            },
            Command::Unregister { node: n } => {
                let gone = node(*n);
                self.jobs.drop_orphans(|id| id != gone, now)
            }
        };
        self.now += 1;
        (effects, fenced)
    }
}

/// Checks one command's effects and the machine after it.
fn check(world: &mut World, before: &HashMap<JobId, JobRecord>, effects: &Effects, fenced: bool) {
    // A fenced report changes nothing and does nothing.
    if fenced {
        assert!(
            effects.is_empty(),
            "a fenced report had effects: {effects:?}"
        );
        let now: HashMap<JobId, JobRecord> = world.jobs.iter().map(|j| (j.id, j.clone())).collect();
        assert_eq!(&now, before, "a fenced report changed the jobs");
    }
    // Log before act: for each job, no durable effect comes after a message about it, and a job
    // whose durable state changed had it logged.
    let mut messaged: HashSet<JobId> = HashSet::new();
    let mut logged: HashSet<JobId> = HashSet::new();
    for effect in effects {
        let Some(id) = effect.job_id() else { continue };
        if effect.is_durable() {
            assert!(
                !messaged.contains(&id),
                "job {id}: a message left before its state was logged: {effects:?}"
            );
            assert!(
                !world.ended.contains(&id),
                "job {id} was logged after it ended"
            );
            logged.insert(id);
            match effect {
                Effect::Persist(job) => {
                    assert!(!job.state.is_terminal());
                    world.disk.insert(id, job.clone());
                }
                Effect::PersistFinished { job, .. } => {
                    assert!(job.state.is_terminal());
                    world.disk.insert(id, job.clone());
                }
                _ => {}
            }
        }
        if effect.is_message() {
            messaged.insert(id);
        }
        if let Effect::Ended(finished) = effect {
            assert!(world.ended.insert(id), "job {id} ended twice");
            assert!(finished.job.state.is_terminal());
        }
    }
    for id in &messaged {
        let was = before.get(id).map(durable);
        let is = world.jobs.get(id).map(durable);
        if was != is {
            assert!(
                logged.contains(id),
                "job {id} changed durably and was not logged"
            );
        }
    }
    // Replaying the log gives back the durable state: every unfinished job as it is, every
    // ended job as ended, nothing else unfinished.
    for job in world.jobs.iter() {
        let on_disk = world.disk.get(&job.id).map(durable);
        assert_eq!(
            on_disk,
            Some(durable(job)),
            "job {} differs from its log",
            job.id
        );
    }
    for (id, job) in &world.disk {
        if job.state.is_terminal() {
            assert!(world.ended.contains(id));
            assert!(
                world.jobs.get(id).is_none(),
                "ended job {id} is unfinished again"
            );
        } else {
            assert!(world.jobs.get(id).is_some(), "job {id} was lost");
        }
    }
    // Cancel (and every end) is final.
    for id in &world.ended {
        assert!(world.jobs.get(id).is_none());
        assert!(world.disk[id].state.is_terminal());
    }
    // Leases: one per job at most, each in its node's set, and the sets hold nothing else.
    let mut per_node: HashMap<NodeId, usize> = HashMap::new();
    let mut groups: HashMap<NodeId, HashSet<u64>> = HashMap::new();
    for job in world.jobs.iter() {
        let counted = job.attempts.iter().filter(|a| a.counted).count();
        assert!(
            counted as u32 <= MAX_ATTEMPTS,
            "job {} has {counted} counted attempts",
            job.id,
        );
        assert_eq!(
            job.lease.is_some(),
            matches!(job.state, JobState::Leased | JobState::Running),
            "job {} is {} with lease {:?}",
            job.id,
            job.state,
            job.lease
        );
        if let Some(lease) = &job.lease {
            assert!(world.jobs.leases[&lease.node_id].contains_key(&job.id));
            *per_node.entry(lease.node_id).or_default() += 1;
            groups
                .entry(lease.node_id)
                .or_default()
                .insert(world.group_of[&job.id]);
        }
    }
    for n in 0..NODES {
        assert_eq!(
            world.jobs.leases_on(node(n)),
            per_node.get(&node(n)).copied().unwrap_or(0)
        );
        // A node's busy workers are the distinct lease groups of its leases.
        assert_eq!(
            world.jobs.groups_on(node(n)),
            groups.get(&node(n)).map_or(0, HashSet::len)
        );
    }
    for job in world.disk.values() {
        assert!(job.attempts.iter().filter(|a| a.counted).count() as u32 <= MAX_ATTEMPTS);
    }
    // The queue is exactly the queued jobs, and client counts are their unfinished jobs.
    let queued: HashSet<JobId> = world.jobs.queue().map(|(id, _)| id).collect();
    let expected: HashSet<JobId> = world
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Queued)
        .map(|j| j.id)
        .collect();
    assert_eq!(queued, expected);
    assert_eq!(world.jobs.queued(), expected.len());
    for client in ["client-0", "client-1"] {
        let n = world
            .jobs
            .iter()
            .filter(|j| j.client.as_deref() == Some(client))
            .count();
        assert_eq!(world.jobs.client_active(client) as usize, n);
    }
    // A restart from the log rebuilds the same machine.
    let restored = Jobs::restore(
        world
            .disk
            .values()
            .filter(|j| !j.state.is_terminal())
            .cloned(),
        MAX_ATTEMPTS,
    );
    assert_eq!(restored.len(), world.jobs.len());
    assert_eq!(restored.queued(), world.jobs.queued());
    for n in 0..NODES {
        assert_eq!(restored.leases_on(node(n)), world.jobs.leases_on(node(n)));
        // Groups are not durable: each lease read back is a group of its own.
        assert_eq!(restored.groups_on(node(n)), restored.leases_on(node(n)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_lifecycle_keeps_its_rules(commands in prop::collection::vec(command(), 1..80)) {
        let mut world = World::new();
        for command in &commands {
            world.step(command);
        }
    }
}

/// A 2×1 PNG header (signature and IHDR), all a hand-off reads of a render.
fn png_header(width: u32, height: u32) -> Arc<[u8]> {
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13];
    png.extend_from_slice(b"IHDR");
    png.extend_from_slice(&width.to_be_bytes());
    png.extend_from_slice(&height.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0]);
    Arc::from(png)
}

mod cases;
