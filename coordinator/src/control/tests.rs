//! The real actor driven by scripted node sessions.

use std::sync::Arc;

use actix::Actor as _;
use drover_shared::family::ModelFamily;
use drover_shared::ids::{JobId, LeaseId};
use drover_shared::job::{JobRequest, JobSpec};

use super::*;
use crate::config::Config;
use crate::limits::ClientId;
use crate::metrics::Metrics;
use crate::records::LoraAdvert;
use crate::store::Store;

fn register(name: &str) -> RegisterNode {
    RegisterNode(NodeRegistration {
        name: name.into(),
        backend: "sim".into(),
        family: ModelFamily::Sd15,
        cross_attention_dim: 768,
        model_id: "m".into(),
        workers: 1,
        max_pixels: 1 << 20,
        loras: vec![LoraAdvert {
            name: "ink".into(),
            family: ModelFamily::Sd15,
            lcm: false,
        }],
        version: "test".into(),
        // 64×64 × 1 step in 4 ms: what the results below measure, so speeds stay equal.
        pixel_steps_per_second: 1_024_000.0,
        sizes: Vec::new(),
        samplers: Vec::new(),
        img2img: true,
        inpaint: true,
        model_name: "demo".into(),
        upscalers: Vec::new(),
        max_batch: 1,
        models: Vec::new(),
        memory_budget: 0,
        residency: None,
    })
}

fn spec(lora: bool) -> JobSpec {
    let body = if lora {
        r#"{"prompt":"x","size":"64x64","steps":1,"loras":[{"name":"ink"}]}"#
    } else {
        r#"{"prompt":"x","size":"64x64","steps":1}"#
    };
    JobRequest::from_json(body.as_bytes())
        .unwrap()
        .validate(|| 1)
        .unwrap()
}

fn client() -> ClientId {
    ClientId {
        label: "test".into(),
        rate_per_min: 0,
        max_active: 0,
        request_id: String::new(),
    }
}

/// The job id and lease of the next assignment on a session, if one is waiting.
fn assignment(rx: &mut SessionReceiver) -> Option<(JobId, LeaseId)> {
    match rx.try_recv().ok()? {
        ToNode::Assign(a) => Some((a.job_id, a.lease_id)),
        ToNode::Cancel { .. } | ToNode::Model { .. } => None,
    }
}

#[test]
fn jobs_go_where_their_lora_set_is_already_merged() {
    actix_rt::System::new().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(Config::for_tests(dir.path().to_path_buf()));
        let plane = ControlPlane::restore(
            Store::temporary().unwrap(),
            config,
            Arc::new(Metrics::default()),
        )
        .unwrap()
        .start();
        let mut sessions = Vec::new();
        for name in ["a", "b"] {
            let node = plane.send(register(name)).await.unwrap().unwrap();
            let (session, rx) = plane
                .send(OpenSession {
                    node_id: node.id,
                    running: Vec::new(),
                    fresh: true,
                })
                .await
                .unwrap()
                .unwrap();
            sessions.push((node.id, session, rx));
        }
        let submit = |lora| {
            plane.send(SubmitJobs {
                specs: vec![spec(lora)],
                client: client(),
                wait: false,
                key: None,
            })
        };
        // Runs one job to the end; answers the index of the node that ran it.
        let mut run = async |lora: bool| {
            submit(lora).await.unwrap().unwrap();
            let (i, (job, lease)) = sessions
                .iter_mut()
                .enumerate()
                .find_map(|(i, (_, _, rx))| assignment(rx).map(|a| (i, a)))
                .expect("an assignment");
            let (node_id, session_id, _) = &sessions[i];
            plane
                .send(NodeEvent {
                    node_id: *node_id,
                    session_id: *session_id,
                    residency: None,
                    report: Some(NodeReport::Succeeded {
                        job_id: job,
                        upscaled: false,
                        batch_size: 1,
                        lease_id: lease,
                        png: Arc::from(vec![1u8, 2, 3]),
                        elapsed_ms: 4,
                    }),
                })
                .await
                .unwrap();
            i
        };
        // The first LoRA job lands on one node, which now has `ink` merged on its worker.
        let inked = run(true).await;
        // From then on, with both nodes free and equally fast, LoRA jobs go to that node and
        // plain jobs to the other, twice in a row each, against what the round robin alone
        // would do (alternate).
        for _ in 0..3 {
            assert_eq!(run(true).await, inked);
            assert_eq!(run(true).await, inked);
            assert_eq!(run(false).await, 1 - inked);
            assert_eq!(run(false).await, 1 - inked);
        }
    });
}

/// The groups (id, size) of the assignments waiting on a session, and how many jobs each.
fn groups(rx: &mut SessionReceiver) -> Vec<(u32, usize)> {
    let mut seen: Vec<(u64, u32, usize)> = Vec::new();
    while let Ok(ToNode::Assign(a)) = rx.try_recv() {
        match seen.iter_mut().find(|(id, _, _)| *id == a.group.id) {
            Some(g) => g.2 += 1,
            None => seen.push((a.group.id, a.group.size, 1)),
        }
    }
    seen.into_iter().map(|(_, size, n)| (size, n)).collect()
}

#[test]
fn a_gather_window_holds_a_lone_job_for_partners_then_lets_it_go() {
    actix_rt::System::new().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_tests(dir.path().to_path_buf());
        config.gather_ms = 1000;
        let plane = ControlPlane::restore(
            Store::temporary().unwrap(),
            Arc::new(config),
            Arc::new(Metrics::default()),
        )
        .unwrap()
        .start();
        // A node that batches up to three jobs joins; answers its session's messages.
        let join = async |name: &str| {
            let RegisterNode(mut registration) = register(name);
            registration.max_batch = 3;
            let node = plane
                .send(RegisterNode(registration))
                .await
                .unwrap()
                .unwrap();
            let open = OpenSession {
                node_id: node.id,
                running: Vec::new(),
                fresh: true,
            };
            plane.send(open).await.unwrap().unwrap().1
        };
        let mut rx = join("batcher").await;
        let submit = |n: usize| {
            plane.send(SubmitJobs {
                specs: vec![spec(false); n],
                client: client(),
                wait: false,
                key: None,
            })
        };
        // A lone job waits for partners; two more within the window complete its group, which
        // leaves at once, whole.
        submit(1).await.unwrap().unwrap();
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(groups(&mut rx), []);
        submit(2).await.unwrap().unwrap();
        assert_eq!(groups(&mut rx), [(3, 3)]);
        // With the worker busy, nothing more is leased; a fresh node takes a lone job only when
        // its window has passed.
        let mut rx2 = join("second").await;
        let submitted = Instant::now();
        submit(1).await.unwrap().unwrap();
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(groups(&mut rx2), [], "left before its window");
        let mut leased = Vec::new();
        while leased.is_empty() && submitted.elapsed() < Duration::from_secs(5) {
            actix_rt::time::sleep(Duration::from_millis(20)).await;
            leased = groups(&mut rx2);
        }
        assert_eq!(leased, [(1, 1)], "held past its window");
        assert!(submitted.elapsed() >= Duration::from_millis(1000));
    });
}
