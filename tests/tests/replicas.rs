//! A replicated coordinator (three replicas over openraft) under faults, with real processes:
//! the leader `kill -9`'d three times and once partitioned from the others while clients submit
//! jobs; a follower killed and restarted; an isolated replica refusing writes.
//!
//! `DROVER_HA_JOBS` sets how many jobs the fail-over test submits (CI: 400) and `DROVER_HA_KILLS`
//! how many times its leader is killed (CI: 3); the benchmark, `scripts/bench-ha.sh`, runs it
//! longer and reads the fail-over times it prints.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use drover_tests::replicas::ReplicaSet;
use drover_tests::{NodeSpec, binaries};
use serde_json::{Value, json};

/// The REST URL of the leader as the replicas say it now: the view of the highest term among
/// those that answer (an isolated old leader still thinks it leads, in an older term).
fn find_leader(agent: &ureq::Agent, urls: &[String]) -> Option<String> {
    let mut best: Option<(u64, String)> = None;
    for url in urls {
        let Ok(mut response) = agent
            .get(format!("{url}/v1/cluster"))
            .config()
            .timeout_global(Some(Duration::from_millis(800)))
            .build()
            .call()
        else {
            continue;
        };
        let Ok(view) = response.body_mut().read_json::<Value>() else {
            continue;
        };
        let (Some(term), Some(leader)) = (view["term"].as_u64(), view["leader_http"].as_str())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(t, _)| term > *t) {
            best = Some((term, leader.to_string()));
        }
    }
    best.map(|(_, url)| url)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// Job ids answered 2xx.
    accepted: Vec<String>,
    /// When each 2xx came, and from which replica (its URL).
    successes: Vec<(Instant, String)>,
    /// Answers that were not 2xx (status or transport error), by kind.
    refusals: HashMap<String, usize>,
}

/// A client: submits `count` jobs, each with its own `Idempotency-Key`, retrying one until it
/// is answered 2xx (a retry after a lost answer replays the same job).
fn client(urls: Vec<String>, name: String, count: usize, seen: Arc<Mutex<Seen>>) -> Result<()> {
    let agent = agent();
    let mut leader = find_leader(&agent, &urls);
    for i in 0..count {
        let key = format!("{name}-{i}");
        let body = json!({"prompt": format!("replicated {name} {i}"), "steps": 4, "seed": i});
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if Instant::now() > deadline {
                bail!("{key}: not accepted within 60 s");
            }
            let Some(url) = leader.clone() else {
                std::thread::sleep(Duration::from_millis(50));
                leader = find_leader(&agent, &urls);
                continue;
            };
            let answer = agent
                .post(format!("{url}/v1/jobs"))
                .header("Idempotency-Key", &key)
                .send_json(&body);
            let kind = match answer {
                Ok(mut response) if response.status().is_success() => {
                    let view: Value = response.body_mut().read_json()?;
                    let id = view["id"].as_str().unwrap_or_default().to_string();
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.accepted.push(id);
                    seen.successes.push((Instant::now(), url.clone()));
                    break;
                }
                Ok(response) => response.status().as_u16().to_string(),
                Err(_) => "no answer".to_string(),
            };
            *seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refusals
                .entry(kind)
                .or_default() += 1;
            std::thread::sleep(Duration::from_millis(30));
            leader = find_leader(&agent, &urls);
        }
    }
    Ok(())
}

fn wait(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

/// Waits for a leader other than `old`; answers it and how long it took.
fn new_leader(set: &ReplicaSet, old: u64) -> Result<u64> {
    let mut found = None;
    wait("a new leader", Duration::from_secs(30), || {
        found = set.ids().into_iter().filter(|id| *id != old).find(|id| {
            set.cluster(*id)
                .is_ok_and(|v| v["leader_id"].as_u64() == Some(*id))
        });
        found.is_some()
    })?;
    found.ok_or_else(|| anyhow::anyhow!("no leader"))
}

fn online_nodes(set: &ReplicaSet, leader: u64) -> usize {
    let Ok(url) = set.url(leader) else { return 0 };
    set.call("GET", &format!("{url}/v1/nodes"), None, &[])
        .ok()
        .and_then(|a| a.body.as_array().cloned())
        .map_or(0, |nodes| {
            nodes.iter().filter(|n| n["state"] == "online").count()
        })
}

#[test]
fn leader_kills_and_a_partition_lose_no_accepted_job() -> Result<()> {
    let total: usize = std::env::var("DROVER_HA_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let kills: usize = std::env::var("DROVER_HA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // Snapshots too: every 300 entries, the log before them purged.
    let mut set = ReplicaSet::start(
        binaries!(),
        3,
        &[
            ("DROVER_SNAPSHOT_EVERY", "300"),
            ("DROVER_SNAPSHOT_KEEP", "50"),
        ],
    )?;
    for i in 0..4 {
        set.add_node(NodeSpec::sim(&format!("ha-{i}"), "sd15"))?;
    }
    let leader = set.wait_for_leader(Duration::from_secs(30))?;
    wait("4 nodes online", Duration::from_secs(30), || {
        online_nodes(&set, leader) == 4
    })?;
    let urls: Vec<String> = set
        .ids()
        .iter()
        .map(|id| set.url(*id))
        .collect::<Result<_>>()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let started = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (urls, seen) = (urls.clone(), seen.clone());
            std::thread::spawn(move || client(urls, format!("c{c}"), total / 4, seen))
        })
        .collect();
    let accepted = |seen: &Arc<Mutex<Seen>>| seen.lock().map_or(0, |s| s.accepted.len());
    let mut killed_at = Vec::new();
    // `kills` leaders killed, spread over the first two thirds of the jobs.
    for round in 1..=kills {
        wait("more jobs accepted", Duration::from_secs(60), || {
            accepted(&seen) >= total * 2 * round / (3 * (kills + 1))
        })?;
        let leader = set.wait_for_leader(Duration::from_secs(30))?;
        killed_at.push((Instant::now(), set.url(leader)?));
        set.kill_replica(leader);
        let next = new_leader(&set, leader)?;
        eprintln!("round {round}: leader {leader} killed, replica {next} leads");
        set.start_replica(leader)?;
    }
    // Then one partitioned from the others.
    wait("more jobs accepted", Duration::from_secs(60), || {
        accepted(&seen) >= total * 4 / 6
    })?;
    let isolated = set.wait_for_leader(Duration::from_secs(30))?;
    set.partition(isolated, true);
    let next = new_leader(&set, isolated)?;
    // The isolated old leader takes no write: its commit cannot reach a majority.
    let refused = set.call(
        "POST",
        &format!("{}/v1/jobs", set.url(isolated)?),
        Some(&json!({"prompt": "on the minority side", "steps": 4})),
        &[],
    )?;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    let message = refused.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("majority"), "{message}");
    set.partition(isolated, false);
    eprintln!("partition: replica {isolated} isolated, replica {next} leads; healed");
    // Healed, it steps down and follows (the leader it follows may have changed since).
    let mut view = Value::Null;
    let followed = wait("the old leader follows", Duration::from_secs(30), || {
        view = set.cluster(isolated).unwrap_or(Value::Null);
        let own = view["replicas"]
            .as_array()
            .and_then(|r| {
                r.iter()
                    .find(|r| r["id"].as_u64() == Some(isolated))
                    .cloned()
            })
            .unwrap_or(Value::Null);
        own["state"] == "follower" && view["leader_id"].as_u64().is_some_and(|l| l != isolated)
    });
    if let Err(e) = followed {
        bail!(
            "{e}: its view {view}\n----- its log -----\n{}",
            set.replica_log(isolated)
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for client in clients {
        client
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    let seen = Arc::try_unwrap(seen)
        .map_err(|_| anyhow::anyhow!("clients still hold the results"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "{total} jobs accepted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ids: BTreeSet<&String> = seen.accepted.iter().collect();
    assert_eq!(ids.len(), total, "one job per idempotent submission");
    // Fail-over: from each kill to the next 2xx from another replica (an answer the killed
    // leader sent just before it died does not count).
    let mut failovers: Vec<u128> = killed_at
        .iter()
        .filter_map(|(at, killed)| {
            let next = seen
                .successes
                .iter()
                .filter(|(when, from)| when > at && from != killed)
                .map(|(when, _)| *when)
                .min()?;
            Some(next.duration_since(*at).as_millis())
        })
        .collect();
    failovers.sort_unstable();
    eprintln!(
        "fail-over from a leader's kill -9 to the first 2xx (ms, sorted): {failovers:?}; p50 {} ms, max {} ms; refusals on the way: {:?}",
        failovers
            .get(failovers.len() / 2)
            .copied()
            .unwrap_or_default(),
        failovers.last().copied().unwrap_or_default(),
        seen.refusals
    );
    // Every accepted job finishes, once, with its image.
    let agent = agent();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut url = find_leader(&agent, &urls).unwrap_or_else(|| urls[0].clone());
    let mut wrong = Vec::new();
    for id in &ids {
        let job = loop {
            match agent.get(format!("{url}/v1/jobs/{id}")).call() {
                Ok(mut r) if r.status() == 200 => {
                    let job: Value = r.body_mut().read_json()?;
                    if job["state"] == "succeeded" || job["state"] == "failed" {
                        break job;
                    }
                }
                _ => url = find_leader(&agent, &urls).unwrap_or_else(|| urls[0].clone()),
            }
            if Instant::now() > deadline {
                bail!("job {id} did not finish");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let succeeded = job["attempts"].as_array().map_or(0, |a| {
            a.iter().filter(|t| t["outcome"] == "succeeded").count()
        });
        if job["state"] != "succeeded" || succeeded != 1 {
            wrong.push(job);
            continue;
        }
        // From the leader (found again when it changed: the healed old leader re-executes).
        let mut status = 0;
        for _ in 0..100 {
            if let Ok(r) = agent.get(format!("{url}/v1/jobs/{id}/image")).call() {
                status = r.status().as_u16();
                if status == 200 {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
            url = find_leader(&agent, &urls).unwrap_or_else(|| urls[0].clone());
        }
        assert_eq!(status, 200, "the image of {id}");
    }
    assert!(
        wrong.is_empty(),
        "{} jobs did not succeed once; the first: {}",
        wrong.len(),
        wrong[0]
    );
    // Every replica holds every image (a follower answers finished jobs from its own store).
    for id in set.ids() {
        let url = set.url(id)?;
        wait("the replica caught up", Duration::from_secs(30), || {
            ids.iter().all(|job| {
                set.call("GET", &format!("{url}/v1/jobs/{job}"), None, &[])
                    .is_ok_and(|a| a.status == 200 && a.body["state"] == "succeeded")
            })
        })?;
    }
    Ok(())
}

#[test]
fn a_follower_catches_up_and_an_isolated_one_takes_no_write() -> Result<()> {
    // A snapshot every 20 entries and no log kept before it: a follower away for 30 jobs
    // catches up from a snapshot.
    let mut set = ReplicaSet::start(
        binaries!(),
        3,
        &[
            ("DROVER_SNAPSHOT_EVERY", "20"),
            ("DROVER_SNAPSHOT_KEEP", "0"),
        ],
    )?;
    set.add_node(NodeSpec::sim("catch-up", "sd15"))?;
    let leader = set.wait_for_leader(Duration::from_secs(30))?;
    wait("the node online", Duration::from_secs(30), || {
        online_nodes(&set, leader) == 1
    })?;
    let follower = set.ids().into_iter().find(|id| *id != leader).unwrap_or(1);
    // Jobs go to whichever replica leads when they are sent (a restart may move the leadership),
    // each with its own Idempotency-Key, so a retry is the same job.
    let submit = |set: &ReplicaSet, n: usize, tag: &str| -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for i in 0..n {
            let key = format!("{tag}-{i}");
            let body = json!({"prompt": format!("catch up {tag} {i}"), "steps": 4});
            wait("a job accepted", Duration::from_secs(30), || {
                let Ok(leader) = set.wait_for_leader(Duration::from_secs(10)) else {
                    return false;
                };
                let Ok(url) = set.url(leader) else {
                    return false;
                };
                match set.call(
                    "POST",
                    &format!("{url}/v1/jobs"),
                    Some(&body),
                    &[("Idempotency-Key", key.as_str())],
                ) {
                    Ok(a) if a.status == 202 => {
                        ids.push(a.body["id"].as_str().unwrap_or_default().to_string());
                        true
                    }
                    _ => false,
                }
            })?;
        }
        Ok(ids)
    };
    // Killed while the others go on: a majority of two commits.
    set.kill_replica(follower);
    let ids = submit(&set, 30, "away")?;
    set.start_replica(follower)?;
    let applied = |set: &ReplicaSet, id: u64| {
        set.cluster(id)
            .ok()
            .and_then(|v| v["replicas"].as_array().cloned())
            .and_then(|r| {
                r.iter()
                    .find(|r| r["id"].as_u64() == Some(id))
                    .and_then(|r| r["last_applied"].as_u64())
            })
    };
    wait("the follower caught up", Duration::from_secs(30), || {
        ids.iter().all(|job| {
            set.url(follower).is_ok_and(|url| {
                set.call("GET", &format!("{url}/v1/jobs/{job}"), None, &[])
                    .is_ok_and(|a| a.status == 200 && a.body["state"] == "succeeded")
            })
        })
    })?;
    assert!(applied(&set, follower).is_some());
    let log = set.replica_log(follower);
    assert!(
        log.contains("snapshot installed"),
        "the follower caught up without a snapshot"
    );
    // Its reads: finished jobs and their images from its own store.
    let url = set.url(follower)?;
    let image = set.call("GET", &format!("{url}/v1/jobs/{}/image", ids[0]), None, &[])?;
    assert_eq!(image.status, 200);
    // Writes go to the leader.
    let write = set.call(
        "POST",
        &format!("{url}/v1/jobs"),
        Some(&json!({"prompt": "x"})),
        &[],
    )?;
    assert_eq!(write.status, 307, "{:?}", write.body);
    let leader_url = set.url(set.wait_for_leader(Duration::from_secs(10))?)?;
    assert_eq!(
        write.location.as_deref(),
        Some(format!("{leader_url}/v1/jobs").as_str())
    );
    // Isolated, it takes no write: 503 with a retry hint once it cannot reach a leader.
    set.partition(follower, true);
    wait(
        "the isolated follower refuses writes",
        Duration::from_secs(30),
        || {
            set.call(
                "POST",
                &format!("{url}/v1/jobs"),
                Some(&json!({"prompt": "x"})),
                &[],
            )
            .is_ok_and(|a| {
                a.status == 503
                    && a.body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("retry"))
            })
        },
    )?;
    // The majority goes on.
    let more = submit(&set, 5, "isolated")?;
    set.partition(follower, false);
    wait(
        "the follower caught up again",
        Duration::from_secs(30),
        || {
            more.iter().all(|job| {
                set.call("GET", &format!("{url}/v1/jobs/{job}"), None, &[])
                    .is_ok_and(|a| a.status == 200 && a.body["state"] == "succeeded")
            })
        },
    )?;
    Ok(())
}

/// Replicas serving gRPC over TLS call each other over TLS (trusting the certificate they
/// share), and their nodes follow them over TLS.
#[test]
fn replicas_that_serve_tls_replicate_over_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let (cert, key) = (
        dir.path().join("replica.crt"),
        dir.path().join("replica.key"),
    );
    std::fs::write(&cert, made.cert.pem())?;
    std::fs::write(&key, made.signing_key.serialize_pem())?;
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mut set = ReplicaSet::start(
        binaries!(),
        3,
        &[("DROVER_TLS_CERT", &cert), ("DROVER_TLS_KEY", &key)],
    )?;
    assert!(set.grpc_urls().starts_with("https://"));
    set.add_node(NodeSpec::sim("over-tls", "sd15"))?;
    set.wait_for_nodes(1, Duration::from_secs(30))?;
    let leader = set.wait_for_leader(Duration::from_secs(10))?;
    let url = set.url(leader)?;
    let accepted = set.call(
        "POST",
        &format!("{url}/v1/jobs"),
        Some(&json!({"prompt": "over tls", "steps": 4})),
        &[],
    )?;
    assert_eq!(accepted.status, 202, "{:?}", accepted.body);
    let id = accepted.body["id"].as_str().unwrap_or_default().to_string();
    // Every replica has it: the log went over TLS.
    for replica in set.ids() {
        let replica_url = set.url(replica)?;
        wait("the job on every replica", Duration::from_secs(30), || {
            set.call("GET", &format!("{replica_url}/v1/jobs/{id}"), None, &[])
                .is_ok_and(|a| a.status == 200 && a.body["state"] == "succeeded")
        })?;
    }
    Ok(())
}
