//! The job lifecycle's rules as single scenarios: fencing, attempts, log-before-act order,
//! limits, the upscale hand-off, queue positions.

use super::*;

/// A result carrying the current lease ends the job once; the same result again, and a result
/// of an earlier lease, change nothing.
#[test]
fn a_result_counts_once_and_only_under_the_current_lease() {
    let mut world = World::new();
    world.step(&Command::Submit {
        n: 1,
        client: 0,
        priority: 0,
    });
    world.step(&Command::Lease {
        job: 0,
        node: 0,
        group: 0,
    });
    let first = world
        .jobs
        .get(&world.ids[0])
        .and_then(|j| j.lease.clone())
        .expect("leased");
    let effects = world.jobs.node_lost(node(0), world.now);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Persist(j) if j.state == JobState::Queued))
    );
    world.step(&Command::Lease {
        job: 0,
        node: 1,
        group: 0,
    });
    let late = NodeReport::Succeeded {
        job_id: world.ids[0],
        upscaled: false,
        batch_size: 1,
        lease_id: first.id,
        png: Arc::from(vec![9u8]),
        elapsed_ms: 1,
    };
    assert!(
        world.jobs.report(node(0), late, world.now).is_empty(),
        "the old lease is fenced"
    );
    let (effects, fenced) = world.step(&Command::Succeed {
        job: 0,
        carries: Carries::Current,
        upscaled: true,
        png: true,
    });
    assert!(!fenced);
    let ended: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Ended(f) => Some(f.job.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].state, JobState::Succeeded);
    assert_eq!(ended[0].node_id, Some(node(1)));
    assert_eq!(
        ended[0]
            .attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect::<Vec<_>>(),
        ["node went offline", "succeeded"]
    );
    let (again, _) = world.step(&Command::Succeed {
        job: 0,
        carries: Carries::Current,
        upscaled: true,
        png: true,
    });
    assert!(again.is_empty(), "a finished job takes no second result");
}

/// A job whose every attempt fails ends failed after `max_attempts`, with every reason.
#[test]
fn attempts_run_out() {
    let mut world = World::new();
    world.step(&Command::Submit {
        n: 1,
        client: 0,
        priority: 0,
    });
    for attempt in 1..=MAX_ATTEMPTS {
        world.step(&Command::Lease {
            job: 0,
            node: 0,
            group: 0,
        });
        let (effects, _) = world.step(&Command::Fail {
            job: 0,
            carries: Carries::Current,
            permanent: false,
        });
        let requeued = effects
            .iter()
            .any(|e| matches!(e, Effect::Metric(JobMetric::Requeued("node_reported"))));
        assert!(requeued, "attempt {attempt} counts under a bounded label");
    }
    let job = &world.disk[&world.ids[0]];
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts.len() as u32, MAX_ATTEMPTS);
    assert!(
        job.error
            .as_deref()
            .is_some_and(|e| e.starts_with("failed after 3 attempts: node reported: out of memory")),
        "{:?}",
        job.error
    );
}

/// A node that reconnects (its process did not restart) without a job it was leased lost the
/// assignment or its result to the link or the coordinator: the job runs again, the attempt is
/// recorded, and it does not count against the job; a node that restarted without it does.
#[test]
fn lost_assignments_do_not_use_up_attempts() {
    let mut world = World::new();
    world.step(&Command::Submit {
        n: 1,
        client: 0,
        priority: 0,
    });
    for _ in 0..2 * MAX_ATTEMPTS {
        world.step(&Command::Lease {
            job: 0,
            node: 0,
            group: 0,
        });
        let (effects, _) = world.step(&Command::Reconcile {
            node: 0,
            keep: 0,
            fresh: false,
        });
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Metric(JobMetric::Requeued("assignment_lost")))),
            "{effects:?}"
        );
        let job = world.jobs.get(&world.ids[0]).expect("still unfinished");
        assert_eq!(job.state, JobState::Queued);
        assert!(job.attempts.last().is_some_and(|a| !a.counted));
    }
    for _ in 0..MAX_ATTEMPTS {
        world.step(&Command::Lease {
            job: 0,
            node: 0,
            group: 0,
        });
        world.step(&Command::Reconcile {
            node: 0,
            keep: 0,
            fresh: true,
        });
    }
    let job = &world.disk[&world.ids[0]];
    assert_eq!(
        job.state,
        JobState::Failed,
        "three restarts without it fail the job"
    );
}

/// The lease is logged before the assignment leaves, and an expired lease is logged as
/// re-queued before its node is told to stop.
#[test]
fn leases_are_logged_before_they_leave() {
    let mut world = World::new();
    world.step(&Command::Submit {
        n: 1,
        client: 0,
        priority: 0,
    });
    let (effects, _) = world.step(&Command::Lease {
        job: 0,
        node: 2,
        group: 0,
    });
    let persist = effects.iter().position(Effect::is_durable).expect("logged");
    let assign = effects
        .iter()
        .position(|e| matches!(e, Effect::Assign(a) if a.node_id == node(2)))
        .expect("assigned");
    assert!(persist < assign);
    // The node is told the steps and guidance of the grant (the model's defaults for what the
    // job left out), not the job's own.
    let Some(Effect::Assign(sent)) = effects.get(assign) else {
        unreachable!("found above")
    };
    let own = &world.jobs.get(&world.ids[0]).expect("leased").spec;
    assert_ne!(own.steps, 4);
    assert_ne!(own.guidance_scale, 7.0);
    assert_eq!((sent.spec.steps, sent.spec.guidance_scale), (4, 7.0));
    let (effects, _) = world.step(&Command::Advance { ms: 10_001 });
    let persist = effects
        .iter()
        .position(|e| matches!(e, Effect::Persist(j) if j.state == JobState::Queued))
        .expect("re-queued and logged");
    let cancel = effects
        .iter()
        .position(|e| matches!(e, Effect::CancelOnNode { node_id, .. } if *node_id == node(2)))
        .expect("the node is told to stop");
    assert!(persist < cancel);
    assert_eq!(
        world.disk[&world.ids[0]].attempts[0].outcome,
        "lease expired"
    );
}

/// A queue at its limit, and a client at its cap, refuse a whole submission and change nothing.
#[test]
fn limits_refuse_whole_submissions() {
    let mut world = World::new();
    for _ in 0..2 {
        world.step(&Command::Submit {
            n: 3,
            client: 0,
            priority: 0,
        });
    }
    assert_eq!(world.jobs.len(), 6);
    let (effects, _) = world.step(&Command::Submit {
        n: 1,
        client: 0,
        priority: 0,
    });
    assert!(effects.is_empty(), "client-0 is at its cap of {CLIENT_CAP}");
    world.step(&Command::Submit {
        n: 2,
        client: 1,
        priority: 0,
    });
    assert_eq!(world.jobs.queued(), QUEUE_LIMIT);
    let (effects, _) = world.step(&Command::Submit {
        n: 1,
        client: 1,
        priority: 0,
    });
    assert!(effects.is_empty(), "the queue is full");
    assert_eq!(world.jobs.len(), 8);
}

/// A job rendered by a node that lacks its upscaler goes back to the queue as the upscale of
/// the render (same id, the render its source, the attempt recorded); its next success ends
/// it with the upscaled image. A result that is no PNG fails it instead.
#[test]
fn a_render_without_its_upscale_is_queued_again_as_the_upscale() {
    let body = r#"{"prompt":"x","size":"64x64","steps":2,"upscale":{"model":"x4"}}"#;
    let spec = JobRequest::from_json(body.as_bytes())
        .and_then(|r| r.validate(|| 1))
        .expect("a valid job");
    let mut jobs = Jobs::restore(Vec::new(), MAX_ATTEMPTS);
    let (a, b) = (JobId::time_ordered(), JobId::time_ordered());
    let records = [a, b].map(|id| JobRecord::new(id, spec.clone())).to_vec();
    jobs.submit(records, QUEUE_LIMIT, CLIENT_CAP)
        .expect("queued");
    let mut next = 0u128;
    let mut lease = |jobs: &mut Jobs, id: JobId, n: usize| {
        next += 1;
        let grant = Grant {
            node_id: node(n),
            lease_id: LeaseId::from_bytes(next.to_be_bytes()),
            size: Size {
                width: 64,
                height: 64,
            },
            steps: 2,
            guidance_scale: 1.5,
            deadline_ms: 10_000,
            group: Group::default(),
        };
        jobs.lease(id, grant, 1);
        grant.lease_id
    };
    let succeed =
        |id: JobId, lease_id: LeaseId, png: Arc<[u8]>, upscaled: bool| NodeReport::Succeeded {
            job_id: id,
            lease_id,
            png,
            elapsed_ms: 5,
            upscaled,
            batch_size: 1,
        };
    let first = lease(&mut jobs, a, 0);
    let effects = jobs.report(node(0), succeed(a, first, png_header(64, 64), false), 2);
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Ended(_))),
        "not finished"
    );
    let job = jobs.get(&a).expect("still unfinished").clone();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.spec.task, JobTask::Upscale);
    let source = job
        .spec
        .source
        .as_deref()
        .expect("the render is the source");
    assert_eq!((source.width, source.height), (64, 64));
    assert_eq!(job.attempts.len(), 1);
    assert!(job.attempts[0].outcome.contains("upscale follows"));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Persist(j) if j.spec.task == JobTask::Upscale)),
        "the hand-off is stored"
    );
    let second = lease(&mut jobs, a, 1);
    let big = png_header(256, 256);
    let effects = jobs.report(node(1), succeed(a, second, big.clone(), true), 3);
    let ended: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Ended(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].job.state, JobState::Succeeded);
    assert_eq!(ended[0].png.as_deref(), Some(&big[..]));
    assert_eq!(ended[0].job.node_id, Some(node(1)));
    let kept = ended[0]
        .job
        .spec
        .source
        .as_deref()
        .expect("the source's record");
    assert!(
        kept.image.is_empty(),
        "a finished record drops the source's bytes"
    );
    assert_eq!(
        (kept.width, kept.image_bytes),
        (64, 29),
        "and keeps what they were"
    );
    // A render that is not a PNG cannot be upscaled: the job fails, saying so.
    let third = lease(&mut jobs, b, 2);
    let effects = jobs.report(node(2), succeed(b, third, Arc::from(vec![1u8]), false), 4);
    assert!(effects.iter().any(|e| matches!(e,
        Effect::Ended(f) if f.job.state == JobState::Failed
            && f.job.error.as_deref() == Some("the node's result is not a PNG"))));
}

#[test]
fn queue_positions_follow_priority_then_acceptance() {
    let mut world = World::new();
    assert!(world.jobs.is_empty());
    world.step(&Command::Submit {
        n: 2,
        client: 0,
        priority: 0,
    });
    world.step(&Command::Submit {
        n: 1,
        client: 1,
        priority: 2,
    });
    assert!(!world.jobs.is_empty());
    let (a, b, urgent) = (world.ids[0], world.ids[1], world.ids[2]);
    // The urgent job is offered first, then the others in the order they were accepted.
    let positions = |jobs: &Jobs| [urgent, a, b].map(|id| jobs.queue_position(id));
    assert_eq!(positions(&world.jobs), [0, 1, 2]);
    world.step(&Command::Lease {
        job: 2,
        node: 0,
        group: 0,
    });
    // Leased, the urgent job has left the queue (position 0: not waiting); the others moved up.
    assert_eq!(
        world.jobs.get(&urgent).map(|j| j.state),
        Some(JobState::Leased)
    );
    assert_eq!(positions(&world.jobs), [0, 0, 1]);
}
