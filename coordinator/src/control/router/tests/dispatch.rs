//! Where jobs go and in what order: round robin, priorities, speed buckets, LoRA affinity and
//! the dispatch round's lease groups, as properties over random farms and queues.

use super::*;
use proptest::prelude::*;

#[test]
fn equal_nodes_take_turns() {
    let nodes = [
        node(1, ModelFamily::Sd15),
        node(2, ModelFamily::Sd15),
        node(3, ModelFamily::Sd15),
    ];
    let spec = job(r#"{"prompt":"x"}"#);
    let picked: std::collections::HashSet<_> = (0..3)
        .map(|turn| pick(&spec, &nodes, turn).unwrap())
        .collect();
    assert_eq!(picked.len(), 3);
    let index = RoutingIndex::new(&nodes);
    let picked: std::collections::HashSet<_> = (0..3)
        .map(|turn| index.pick(&spec, &nodes, turn).unwrap())
        .collect();
    assert_eq!(picked.len(), 3, "the index rotates among equal nodes too");
}

#[test]
fn priorities_order_the_queue_and_age() {
    let job = |priority, created_ms, id| QueuedJob {
        priority,
        created_ms,
        id,
    };
    let mut jobs = vec![
        job(0, 1_000, 'a'),
        job(5, 2_000, 'b'),
        job(0, 500, 'c'),
        job(5, 1_500, 'd'),
    ];
    queue_order(&mut jobs);
    assert_eq!(jobs.iter().map(|j| j.id).collect::<String>(), "dbca");
    // A low-priority job that waited 3.3 aging periods overtakes a fresh +2 job...
    let mut jobs = vec![job(2, 100_000, 'n'), job(-1, 0, 'o')];
    queue_order(&mut jobs);
    assert_eq!(jobs[0].id, 'o');
    // ...but not one that came 2.7 periods later.
    let mut jobs = vec![job(2, 80_000, 'n'), job(-1, 0, 'o')];
    queue_order(&mut jobs);
    assert_eq!(jobs[0].id, 'n');
}

fn arb_family() -> impl Strategy<Value = ModelFamily> {
    prop::sample::select(ModelFamily::ALL.to_vec())
}

fn arb_node() -> impl Strategy<Value = (ModelFamily, bool, bool, bool, u32, u64, usize)> {
    (
        arb_family(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u32..3,
        0u64..4,
        0usize..3,
    )
}

/// [`arb_node`] biased toward nodes that can take work (online, on time, not draining, with
/// free slots), so dispatch rounds place something in most cases rather than one in twelve.
fn arb_live_node() -> impl Strategy<Value = (ModelFamily, bool, bool, bool, u32, u64, usize)> {
    (
        arb_family(),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        prop_oneof![1 => Just(0u32), 4 => 1u32..4],
        0u64..4,
        prop_oneof![3 => Just(0usize), 1 => 1usize..3],
    )
}

proptest! {
    /// Placing jobs one after another through the index never gives a node more jobs than it
    /// has free slots, and stops only when no eligible slot is left.
    #[test]
    fn index_placements_respect_slots(
        specs in prop::collection::vec(arb_node(), 0..8),
        jobs in 0usize..30,
    ) {
        let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, s)| NodeView {
            online: s.1, suspect: s.2, draining: s.3, free_slots: s.4,
            max_pixels: 2048 * 2048,
            ..node(i as u8, s.0)
        }).collect();
        let spec = job(r#"{"prompt":"x"}"#);
        let mut index = RoutingIndex::new(&nodes);
        let mut given = vec![0u32; nodes.len()];
        let mut placed = 0;
        for turn in 0..jobs as u64 {
            let Some(i) = index.pick(&spec, &nodes, turn) else { break };
            index.take(i, 0);
            given[i] += 1;
            placed += 1;
        }
        for (i, n) in nodes.iter().enumerate() {
            prop_assert!(given[i] <= n.free_slots);
            if given[i] > 0 { prop_assert!(eligibility(&spec, n).is_ok()); }
        }
        let capacity: u32 = nodes.iter().filter(|n| eligibility(&spec, n).is_ok()).map(|n| n.free_slots).sum();
        prop_assert_eq!(placed, jobs.min(capacity as usize));
    }
}

proptest! {
    /// The picked node is always eligible; if none is picked, every node has a reason; a job is
    /// never left waiting while an eligible node exists.
    #[test]
    fn pick_is_sound_and_complete(
        specs in prop::collection::vec(arb_node(), 0..8),
        wanted in prop::option::of(arb_family()),
        size in prop::sample::select(vec![None, Some("512x512"), Some("1024x1024"), Some("2048x2048")]),
        turn in any::<u64>(),
    ) {
        let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, s)| NodeView {
            online: s.1, suspect: s.2, draining: s.3, free_slots: s.4,
            max_pixels: [512 * 512, 768 * 768, 1024 * 1024, 2048 * 2048][s.5 as usize],
            sizes: FIXED_SIZES[s.6],
            samplers: &[],
            ..node(i as u8, s.0)
        }).collect();
        let mut spec = job(r#"{"prompt":"x"}"#);
        spec.model = wanted.map(ModelSelector::Family);
        spec.size = size.map(|s| s.parse().unwrap());
        let any_eligible = nodes.iter().any(|n| eligibility(&spec, n).is_ok());
        match pick(&spec, &nodes, turn) {
            Ok(id) => {
                let chosen = nodes.iter().find(|n| n.id == id).unwrap();
                prop_assert!(eligibility(&spec, chosen).is_ok());
                if let Some(f) = wanted { prop_assert_eq!(chosen.family, f); }
                let size = spec.size_on(chosen.family, chosen.sizes);
                prop_assert!(size.pixels() <= chosen.max_pixels);
                prop_assert!(chosen.sizes.is_empty() || chosen.sizes.contains(&size));
            }
            Err(reasons) => {
                prop_assert!(!any_eligible);
                prop_assert_eq!(reasons.len(), nodes.len());
            }
        }
        // The capability index agrees: it finds an eligible node exactly when one exists, and
        // the same one the scan picks.
        let index = RoutingIndex::new(&nodes);
        match index.pick(&spec, &nodes, turn) {
            Some(i) => {
                prop_assert!(eligibility(&spec, &nodes[i]).is_ok());
                prop_assert_eq!(Ok(nodes[i].id), pick(&spec, &nodes, turn).map_err(|_| ()));
            }
            None => prop_assert!(!any_eligible),
        }
        // A feasible job has at least one capable node; an infeasible one has a reason per node.
        match feasibility(&spec, &nodes) {
            Ok(()) => prop_assert!(nodes.iter().any(|n| capability(&spec, n).is_ok())),
            Err(r) => prop_assert_eq!(r.len(), nodes.len()),
        }
    }
}

/// Speeds the affinity test draws from: unknown, two within one ~9% bucket, and faster.
const SPEEDS: [f64; 4] = [0.0, 1.0e6, 1.02e6, 8.0e6];

fn lora_job(set: usize) -> JobSpec {
    let mut spec = job(r#"{"prompt":"x","model":"sd15"}"#);
    let names: &[&str] = [&[][..], &["ink"][..], &["ink", "film"][..]][set];
    spec.loras = names
        .iter()
        .map(|n| LoraRef {
            name: n.to_string(),
            strength: 1.0,
        })
        .collect();
    spec
}

proptest! {
    /// The index picks exactly the node the scan picks; the pick is never slower than an
    /// eligible node, and among the fastest eligible nodes it has the job's LoRA set merged
    /// whenever one of them has (LoRA-affine placement is preferred).
    #[test]
    fn placement_prefers_speed_then_lora_affinity(
        specs in prop::collection::vec(
            (any::<bool>(), 0u32..3, 0usize..4, prop::collection::vec(0usize..3, 0..3)),
            1..10,
        ),
        set in 0usize..3,
        turn in any::<u64>(),
    ) {
        let adverts: &'static [LoraAdvert] = Box::leak(Box::new([
            LoraAdvert { name: "ink".into(), family: ModelFamily::Sd15, lcm: false },
            LoraAdvert { name: "film".into(), family: ModelFamily::Sd15, lcm: false },
        ]));
        let spec = lora_job(set);
        let job_set = lora_set_key(&spec.loras);
        let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, s)| {
            let loaded: Vec<u64> = s.3.iter().map(|k| lora_set_key(&lora_job(*k).loras)).collect();
            NodeView {
                online: s.0,
                free_slots: s.1,
                pixel_steps_per_second: SPEEDS[s.2],
                loaded: Box::leak(loaded.into_boxed_slice()),
                loras: adverts,
                ..node(i as u8, ModelFamily::Sd15)
            }
        }).collect();
        let scan = pick(&spec, &nodes, turn).ok();
        let index = RoutingIndex::new(&nodes).pick(&spec, &nodes, turn).map(|i| nodes[i].id);
        prop_assert_eq!(scan, index);
        let eligible: Vec<&NodeView<'_>> = nodes.iter().filter(|n| eligibility(&spec, n).is_ok()).collect();
        match scan {
            None => prop_assert!(eligible.is_empty()),
            Some(id) => {
                let chosen = nodes.iter().find(|n| n.id == id).unwrap();
                let top = eligible.iter().map(|n| speed_key(n)).max().unwrap();
                prop_assert_eq!(speed_key(chosen), top);
                let affine_at_top = eligible.iter().any(|n| speed_key(n) == top && affine(job_set, n));
                prop_assert_eq!(affine(job_set, chosen), affine_at_top);
            }
        }
    }
}

proptest! {
    /// A dispatch round over a queue of mixed jobs (families, sizes, LoRA sets, steps,
    /// priorities) on nodes that batch or not: every placement is eligible; no node gets more
    /// lease groups than its free slots, nor a group larger than its `max_batch`; only jobs of
    /// one batch key share a group; and a job left waiting had no eligible node with a slot still
    /// free (its slots went to groups led by jobs *ahead of it* in the queue) and no group on such
    /// a node, led from ahead of it, that it could have joined: nothing starves while an
    /// eligible worker is idle, and priorities still order the queue.
    #[test]
    fn dispatch_round_never_leaves_an_eligible_slot_idle(
        specs in prop::collection::vec((arb_live_node(), any::<bool>(), 1u32..5), 0..8),
        jobs in prop::collection::vec((
            prop::option::of(arb_family()),
            prop::sample::select(vec![None, Some("512x512"), Some("1024x1024")]),
            0usize..3,
            -2i32..3,
            0u64..200_000,
            prop::sample::select(vec![4u32, 8]),
            prop::bool::weighted(0.3),
        ), 0..24),
        pivot in 0usize..8,
    ) {
        let adverts: &'static [LoraAdvert] = Box::leak(Box::new(
            ModelFamily::ALL.iter().flat_map(|f| ["ink", "film"].map(|n| LoraAdvert {
                name: n.into(), family: *f, lcm: false,
            })).collect::<Vec<_>>(),
        ));
        let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, (s, has, batch))| NodeView {
            online: s.1, suspect: s.2, draining: s.3, free_slots: s.4,
            max_pixels: [512 * 512, 768 * 768, 1024 * 1024, 2048 * 2048][s.5 as usize],
            sizes: FIXED_SIZES[s.6],
            samplers: &[],
            loras: if *has { adverts } else { &[] },
            max_batch: *batch,
            ..node(i as u8, s.0)
        }).collect();
        let mut queued: Vec<QueuedJob<usize>> = jobs.iter().enumerate().map(|(i, j)| QueuedJob {
            priority: j.3, created_ms: j.4, id: i,
        }).collect();
        queue_order(&mut queued);
        let job_specs: Vec<JobSpec> = jobs.iter().map(|(family, size, set, priority, _, steps, _)| {
            let mut spec = lora_job(*set);
            spec.model = family.map(ModelSelector::Family);
            spec.size = size.map(|s| s.parse().unwrap());
            spec.priority = *priority;
            spec.steps = *steps;
            spec
        }).collect();
        let mut index = CapabilityIndex::default();
        for (i, n) in nodes.iter().enumerate() {
            index.upsert(i, Member::of(n));
        }
        // Some jobs are young enough to wait for partners (a gather window).
        let young = |j: usize| jobs[j].6;
        let round = plan_dispatch(
            &mut index,
            queued.iter().map(|q| (q.id, &job_specs[q.id])),
            pivot,
            |_, spec, k| fit_on(spec, &nodes[k]),
            |spec, k| batch_key(spec, &nodes[k]),
            young,
            |k| k + 1,
        );
        let groups = round.groups;
        let mut place_of = vec![0usize; jobs.len()];
        for (position, q) in queued.iter().enumerate() {
            place_of[q.id] = position;
        }
        let mut given = vec![0u32; nodes.len()];
        let mut placed = vec![false; jobs.len()];
        for (k, group) in &groups {
            prop_assert!(!group.is_empty());
            prop_assert!(group.len() as u32 <= nodes[*k].max_batch);
            // A group short of the node's batch never holds only jobs that could wait.
            prop_assert!(
                group.len() as u32 == nodes[*k].max_batch || !group.iter().all(|j| young(*j)),
                "a short group of young jobs left: {:?}", group
            );
            // Jobs of a group in queue order, the first (its leader) eligible, all of one key.
            prop_assert!(group.windows(2).all(|w| place_of[w[0]] < place_of[w[1]]));
            let leader = batch_key(&job_specs[group[0]], &nodes[*k]);
            for j in group {
                prop_assert!(!placed[*j], "job {} placed twice", j);
                placed[*j] = true;
                prop_assert!(eligibility(&job_specs[*j], &nodes[*k]).is_ok());
                if group.len() > 1 {
                    prop_assert!(leader.is_some());
                    prop_assert_eq!(&batch_key(&job_specs[*j], &nodes[*k]), &leader);
                }
            }
            given[*k] += 1;
        }
        for (k, n) in nodes.iter().enumerate() {
            prop_assert!(given[k] <= n.free_slots);
        }
        // Only young jobs are held.
        prop_assert!(round.held.iter().all(|j| young(*j) && !placed[*j]));
        for (position, q) in queued.iter().enumerate() {
            if placed[q.id] {
                continue;
            }
            let spec = &job_specs[q.id];
            for (k, n) in nodes.iter().enumerate() {
                if eligibility(spec, n).is_err() {
                    continue;
                }
                let ahead: Vec<&Vec<usize>> = groups
                    .iter()
                    .filter(|(node, g)| *node == k && place_of[g[0]] < position)
                    .map(|(_, g)| g)
                    .collect();
                // A young job may have been held instead; an old one never waits on a slot.
                prop_assert!(
                    young(q.id) || ahead.len() as u32 >= n.free_slots,
                    "job at queue place {} waits while node {} had a free eligible slot that \
                     only later jobs took ({} groups ahead of it, {} slots)",
                    position, k, ahead.len(), n.free_slots
                );
                // Nor was there room for it in a group of its key led from ahead of it, that
                // jobs behind it joined or that stayed short.
                let key = batch_key(spec, n);
                for g in ahead {
                    let room = (g.len() as u32) < n.max_batch
                        || g.iter().any(|j| place_of[*j] > position);
                    prop_assert!(
                        !(room && key.is_some() && batch_key(&job_specs[g[0]], n) == key),
                        "job at queue place {} could have joined a group on node {}",
                        position, k
                    );
                }
            }
        }
    }
}

#[test]
fn compatible_jobs_share_a_lease_group_and_others_wait_for_a_worker() {
    // One node, one free worker, batches of up to 3: of five queued jobs, the first and the
    // two later ones of its key go together; the one with other steps and the fourth of the
    // key wait (no worker, a full group).
    let batching = NodeView {
        max_batch: 3,
        ..node(1, ModelFamily::Sd15)
    };
    let spec = |steps: u32, prompt: &str| {
        let mut s = job(&format!(r#"{{"prompt":"{prompt}","seed":1}}"#));
        s.steps = steps;
        s
    };
    let queue = [
        spec(4, "a"),
        spec(8, "b"),
        spec(4, "c"),
        spec(4, "d"),
        spec(4, "e"),
    ];
    assert_eq!(one_round(&batching, &queue), vec![(0, vec![0, 2, 3])]);
    // Prompts and seeds may differ within a key; size, LoRAs, guidance may not; a node that
    // does not batch gives no key.
    let base = spec(4, "x");
    let key = batch_key(&base, &batching);
    assert!(key.is_some());
    let mut seeded = spec(4, "y");
    seeded.seed = 99;
    assert_eq!(batch_key(&seeded, &batching), key);
    let sized = job(r#"{"prompt":"x","size":"512x768"}"#);
    assert_ne!(batch_key(&sized, &batching), key);
    assert_ne!(batch_key(&lora_job(1), &batching), key);
    let mut guided = base.clone();
    guided.guidance_scale += 1.0;
    assert_ne!(batch_key(&guided, &batching), key);
    assert_eq!(batch_key(&base, &node(2, ModelFamily::Sd15)), None);
    // A second free worker takes the job of other steps at once; the fourth of the key waits.
    let two = NodeView {
        free_slots: 2,
        ..batching
    };
    assert_eq!(
        one_round(&two, &queue),
        vec![(0, vec![0, 2, 3]), (0, vec![1])]
    );
}

/// One dispatch round of `queue` over the one node `node`: its lease groups.
fn one_round(node: &NodeView<'static>, queue: &[JobSpec]) -> Vec<(usize, Vec<usize>)> {
    let mut index = CapabilityIndex::default();
    index.upsert(0usize, Member::of(node));
    plan_dispatch(
        &mut index,
        queue.iter().enumerate(),
        0,
        |_, s, _| fit_on(s, node),
        |s, _| batch_key(s, node),
        |_| false,
        |k| k + 1,
    )
    .groups
}

#[test]
fn a_node_keeps_its_workers_recent_lora_sets() {
    let mut loaded = vec![0];
    remember_set(&mut loaded, 7, 2);
    assert_eq!(loaded, vec![7, 0]);
    remember_set(&mut loaded, 9, 2);
    assert_eq!(loaded, vec![9, 7]);
    remember_set(&mut loaded, 7, 2);
    assert_eq!(loaded, vec![7, 9]);
    assert_eq!(lora_set_key(&[]), 0);
    let ink = lora_job(1).loras;
    let mut reversed = lora_job(2).loras;
    reversed.reverse();
    assert_eq!(
        lora_set_key(&reversed),
        lora_set_key(&lora_job(2).loras),
        "order does not matter"
    );
    assert_ne!(lora_set_key(&ink), lora_set_key(&lora_job(2).loras));
    let mut stronger = ink.clone();
    stronger[0].strength = 0.5;
    assert_ne!(lora_set_key(&ink), lora_set_key(&stronger), "strength does");
}
