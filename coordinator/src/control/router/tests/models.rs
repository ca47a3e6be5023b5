//! Nodes with several models: which model a job runs on, residency before speed, reasons that
//! name the catalogue, and the index agreeing with the scan over random catalogues.

use super::*;
use crate::records::ModelAdvert;
use proptest::prelude::*;

/// The models the random farms draw from: two SD1.5 models, an SDXL one and an SD2 one.
fn pool() -> &'static [ModelAdvert] {
    static POOL: std::sync::OnceLock<Vec<ModelAdvert>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        [
            ("aa01", "dream", ModelFamily::Sd15, 2_000_000_000),
            ("bb02", "photo", ModelFamily::Sd15, 3_000_000_000),
            ("cc03", "xl", ModelFamily::Sdxl, 7_000_000_000),
            ("dd04", "two", ModelFamily::Sd2, 4_000_000_000),
        ]
        .into_iter()
        .map(|(id, name, family, bytes)| ModelAdvert {
            model_id: id.into(),
            name: name.into(),
            family,
            max_pixels: 2048 * 2048,
            sizes: Vec::new(),
            samplers: Vec::new(),
            img2img: true,
            inpaint: true,
            bytes,
            pinned: false,
        })
        .collect()
    })
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

/// A node serving the pool's models `models` (positions), with `resident` of them loaded.
fn multi(i: u8, models: &[usize], resident: &[usize]) -> NodeView<'static> {
    let catalogue: Vec<ModelAdvert> = models.iter().map(|&m| pool()[m].clone()).collect();
    let ids: Vec<String> = resident
        .iter()
        .map(|&m| pool()[m].model_id.clone())
        .collect();
    let first = &pool()[models[0]];
    NodeView {
        family: first.family,
        model_id: first.model_id.clone().leak(),
        models: leak(catalogue),
        resident: Some(leak(ids)),
        ..node(i, first.family)
    }
}

#[test]
fn a_node_serves_every_family_of_its_catalogue_and_says_which_models_it_has() {
    let n = multi(1, &[0, 2], &[0]);
    for (json, id, resident) in [
        (r#"{"prompt":"x"}"#, "aa01", true),
        (r#"{"prompt":"x","model":"sdxl"}"#, "cc03", false),
        (r#"{"prompt":"x","model":"CC03"}"#, "cc03", false),
    ] {
        let choice = choose_model(&job(json), &n).unwrap();
        assert_eq!((choice.facts.id, choice.resident), (id, resident), "{json}");
    }
    match capability(&job(r#"{"prompt":"x","model":"dd04"}"#), &n) {
        Err(SkipReason::WrongModel { wanted, has }) => {
            assert_eq!(wanted, "dd04");
            assert_eq!(has, "aa01, cc03");
        }
        other => panic!("{other:?}"),
    }
    // The reason is the one of a model the selector names, not "wrong family" of another.
    let small = NodeView {
        models: leak(
            n.models
                .iter()
                .map(|m| ModelAdvert {
                    max_pixels: 1024 * 1024,
                    ..m.clone()
                })
                .collect(),
        ),
        ..n
    };
    let big = job(r#"{"prompt":"x","model":"sdxl","size":"2048x2048"}"#);
    assert!(matches!(
        capability(&big, &small),
        Err(SkipReason::TooLarge { .. })
    ));
}

#[test]
fn a_loaded_model_comes_first_then_the_cheapest_to_load() {
    // Two SD1.5 models: the loaded one serves an SD1.5 job, whatever the order.
    let n = multi(1, &[0, 1], &[1]);
    let sd15 = job(r#"{"prompt":"x","model":"sd15"}"#);
    assert_eq!(choose_model(&sd15, &n).unwrap().facts.id, "bb02");
    // Neither loaded: the smaller one (2 GB) is loaded.
    let n = multi(1, &[1, 0], &[]);
    let choice = choose_model(&sd15, &n).unwrap();
    assert_eq!((choice.facts.id, choice.resident), ("aa01", false));
    // A node where the model is loaded wins over a faster one that must load it.
    let loaded = NodeView {
        pixel_steps_per_second: 1.0e6,
        ..multi(1, &[0], &[0])
    };
    let fast = NodeView {
        pixel_steps_per_second: 8.0e6,
        ..multi(2, &[0], &[])
    };
    let nodes = [fast, loaded];
    let spec = job(r#"{"prompt":"x","model":"aa01"}"#);
    assert_eq!(pick(&spec, &nodes, 0).unwrap(), nodes[1].id);
    assert_eq!(RoutingIndex::new(&nodes).pick(&spec, &nodes, 0), Some(1));
}

#[test]
fn a_model_loaded_nowhere_is_loaded_where_the_job_completes_soonest() {
    let last_load = |ms| {
        leak(vec![ModelResidency {
            model_id: "bb02".into(),
            loads: 1,
            load_ms_total: ms,
            last_load_ms: ms,
            ..Default::default()
        }])
    };
    // A fast node that loads photo in 60 s, and one eight times slower that loads it in 2 s.
    let fast = NodeView {
        pixel_steps_per_second: 8.0e6,
        residency: last_load(60_000),
        ..multi(1, &[0, 1], &[0])
    };
    let quick = NodeView {
        pixel_steps_per_second: 1.0e6,
        residency: last_load(2_000),
        ..multi(2, &[0, 1], &[0])
    };
    let nodes = [fast, quick];
    // 512² × 4 steps: 1 s on the slow node, 0.13 s on the fast one; the load decides.
    let spec = job(r#"{"prompt":"x","model":"photo","size":"512x512","steps":4}"#);
    assert_eq!(pick(&spec, &nodes, 0).unwrap(), nodes[1].id);
    assert_eq!(RoutingIndex::new(&nodes).pick(&spec, &nodes, 0), Some(1));
    // Where the model is loaded, speed decides as before.
    let dream = job(r#"{"prompt":"x","model":"dream"}"#);
    assert_eq!(pick(&dream, &nodes, 0).unwrap(), nodes[0].id);
}

fn arb_multi_node() -> impl Strategy<Value = (Vec<usize>, Vec<bool>, bool, u32, usize)> {
    (
        prop::sample::subsequence(vec![0usize, 1, 2, 3], 1..=3).prop_shuffle(),
        prop::collection::vec(any::<bool>(), 3),
        prop::bool::weighted(0.85),
        0u32..3,
        0usize..4,
    )
}

proptest! {
    /// Over random catalogues and residencies: the index picks exactly what the scan picks;
    /// the pick can serve the job with the model it names; and when some eligible node has a
    /// model for the job loaded, the pick runs it on a loaded model (residency before speed).
    #[test]
    fn placement_prefers_loaded_models_and_the_index_agrees(
        specs in prop::collection::vec(arb_multi_node(), 1..8),
        selector in 0usize..8,
        turn in any::<u64>(),
    ) {
        let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, (models, loaded, online, free, speed))| {
            let resident: Vec<usize> = models.iter().zip(loaded).filter(|(_, l)| **l).map(|(m, _)| *m).collect();
            NodeView {
                online: *online,
                free_slots: *free,
                pixel_steps_per_second: [0.0, 1.0e6, 1.02e6, 8.0e6][*speed],
                ..multi(i as u8, models, &resident)
            }
        }).collect();
        let spec = job(match selector {
            0 => r#"{"prompt":"x"}"#,
            1 => r#"{"prompt":"x","model":"sd15"}"#,
            2 => r#"{"prompt":"x","model":"sdxl"}"#,
            3 => r#"{"prompt":"x","model":"aa01"}"#,
            4 => r#"{"prompt":"x","model":"BB02"}"#,
            5 => r#"{"prompt":"x","model":"cc03"}"#,
            6 => r#"{"prompt":"x","model":"photo"}"#,
            _ => r#"{"prompt":"x","model":"sd2"}"#,
        });
        let scan = pick(&spec, &nodes, turn).ok();
        let index = RoutingIndex::new(&nodes).pick(&spec, &nodes, turn).map(|i| nodes[i].id);
        prop_assert_eq!(scan, index);
        let eligible: Vec<&NodeView<'_>> = nodes.iter().filter(|n| eligibility(&spec, n).is_ok()).collect();
        match scan {
            None => prop_assert!(eligible.is_empty()),
            Some(id) => {
                let chosen = nodes.iter().find(|n| n.id == id).unwrap();
                let choice = choose_model(&spec, chosen).unwrap();
                match &spec.model {
                    Some(ModelSelector::ModelId(m)) => prop_assert!(choice.facts.id.eq_ignore_ascii_case(m)),
                    Some(ModelSelector::Family(f)) => prop_assert_eq!(choice.facts.family, *f),
                    Some(ModelSelector::Name(n)) => prop_assert_eq!(choice.facts.name, n.as_str()),
                    None => {}
                }
                prop_assert!(chosen.models.iter().any(|m| m.model_id == choice.facts.id));
                let any_loaded = eligible.iter().any(|n| choose_model(&spec, n).unwrap().resident);
                prop_assert_eq!(choice.resident, any_loaded);
                // Loaded nowhere: the soonest estimated completion (load and run).
                if !any_loaded {
                    let soonest = eligible.iter().filter_map(|n| fit_on(&spec, n)).map(|f| f.cost).min();
                    prop_assert_eq!(fit_on(&spec, chosen).map(|f| f.cost), soonest);
                }
            }
        }
    }
}

#[test]
fn load_times_come_from_the_last_load_then_the_node_rate_then_a_default() {
    let r = |id: &str, loads, total, last| ModelResidency {
        model_id: id.into(),
        copies: 0,
        loads,
        evictions: 0,
        load_ms_total: total,
        last_load_ms: last,
    };
    let base = multi(1, &[0, 1, 2], &[0]);
    let facts: Vec<ModelFacts<'_>> = base.model_facts().collect();
    // Loaded: nothing to wait for. Never measured anywhere: 1 GB/s.
    assert_eq!(load_estimate_ms(&base, &facts[0]), 0);
    assert_eq!(
        load_estimate_ms(&base, &facts[2]),
        7_000_000_000 / DEFAULT_LOAD_BYTES_PER_MS
    );
    // dream (2 GB) loaded twice in 4 ms: 1 GB/ms for the others.
    let residency = leak(vec![r("aa01", 2, 4, 2)]);
    let measured = NodeView { residency, ..base };
    assert_eq!(load_estimate_ms(&measured, &facts[2]), 7);
    // photo's own last load wins.
    let residency = leak(vec![r("aa01", 2, 4, 2), r("bb02", 1, 40, 40)]);
    let own = NodeView { residency, ..base };
    assert_eq!(load_estimate_ms(&own, &facts[1]), 40);
}

#[test]
fn a_job_waits_for_a_loaded_model_at_most_its_load_time() {
    // Loaded nowhere: load at once. Loaded on a busy node: wait up to the switch's two loads.
    assert!(may_load(0, 5_000, false));
    assert!(!may_load(9_999, 5_000, true));
    assert!(may_load(10_000, 5_000, true));
    let busy = NodeView {
        free_slots: 0,
        ..multi(1, &[0, 1], &[1])
    };
    let draining = NodeView {
        draining: true,
        ..multi(2, &[0, 2], &[2])
    };
    let loaded = LoadedModels::of([busy, draining]);
    assert!(loaded.serves(&job(r#"{"prompt":"x","model":"bb02"}"#)));
    assert!(loaded.serves(&job(r#"{"prompt":"x","model":"photo"}"#)));
    assert!(loaded.serves(&job(r#"{"prompt":"x","model":"sd15"}"#)));
    assert!(
        !loaded.serves(&job(r#"{"prompt":"x","model":"sdxl"}"#)),
        "draining nodes do not count"
    );
    assert!(!loaded.serves(&job(r#"{"prompt":"x","model":"aa01"}"#)));
}

#[test]
fn waiting_jobs_have_their_model_loaded_ahead_on_the_idle_node_that_loads_it_fastest() {
    let spec = job(r#"{"prompt":"x","model":"bb02"}"#);
    let busy_holder = NodeView {
        free_slots: 0,
        ..multi(1, &[1], &[1])
    };
    // Idle: every worker (two) free.
    let slow_loader = NodeView {
        free_slots: 2,
        ..multi(2, &[0, 1], &[0])
    };
    let quick_loader = NodeView {
        free_slots: 2,
        residency: leak(vec![ModelResidency {
            model_id: "bb02".into(),
            last_load_ms: 1,
            loads: 1,
            load_ms_total: 1,
            ..Default::default()
        }]),
        ..multi(3, &[0, 1], &[0])
    };
    let half_busy = NodeView {
        free_slots: 1,
        ..multi(4, &[1], &[])
    };
    let nodes = [busy_holder, slow_loader, quick_loader, half_busy];
    assert_eq!(
        preload_target(&spec, &nodes),
        Some((nodes[2].id, "bb02")),
        "idle, not loaded, fastest to load"
    );
    // A free node with it loaded needs no preload.
    let free_holder = NodeView {
        free_slots: 2,
        ..multi(5, &[1], &[1])
    };
    assert_eq!(
        preload_target(&spec, &[free_holder, nodes[2].clone()]),
        None
    );
}
