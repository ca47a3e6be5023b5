//! Routing decision time: `router::pick` and `router::feasibility` over registries of 10, 1,000
//! and 10,000 nodes (mixed families, some busy, offline or draining), against a baseline of
//! scanning the same snapshot without deciding anything. Prints mean nanoseconds per decision.
//!
//! Run: `cargo bench -p drover-coordinator --bench routing`.

use std::hint::black_box;
use std::time::Instant;

use drover_coordinator::control::router::{
    CapabilityIndex, Member, RoutingIndex, feasibility, pick, sample_farm,
};
use drover_shared::job::JobRequest;

fn time(iterations: u32, mut f: impl FnMut(u64)) -> f64 {
    let started = Instant::now();
    for i in 0..iterations {
        f(u64::from(i));
    }
    started.elapsed().as_nanos() as f64 / f64::from(iterations)
}

fn main() {
    let job = JobRequest::from_json(br#"{"prompt":"x","model":"sdxl","size":"1024x1024"}"#)
        .and_then(|r| r.validate(|| 1))
        .expect("valid job");
    println!(
        "{:>8} {:>12} {:>12} {:>14} {:>14} {:>12} {:>12} {:>10}",
        "nodes",
        "scan ns",
        "pick ns",
        "index pick ns",
        "index update",
        "index build",
        "feasible ns",
        "pick/scan"
    );
    for n in [10usize, 1_000, 10_000] {
        let views = sample_farm(n);
        let iterations = (2_000_000 / n).max(200) as u32;
        let scan = time(iterations, |_| {
            black_box(views.iter().filter(|v| black_box(v.free_slots) > 0).count());
        });
        let picked = time(iterations, |turn| {
            black_box(pick(black_box(&job), &views, turn).ok());
        });
        let index = RoutingIndex::new(&views);
        let indexed = time(iterations.max(100_000), |turn| {
            black_box(index.pick(black_box(&job), &views, turn));
        });
        let built = time(iterations.min(2_000), |_| {
            black_box(RoutingIndex::new(black_box(&views)).free_slots());
        });
        // What the control plane pays when one node changes (a lease, a result, a heartbeat
        // that moves its state): one node out of the index and back in with one slot less.
        let mut live = CapabilityIndex::default();
        for v in &views {
            live.upsert(v.id, Member::of(v));
        }
        let members: Vec<_> = views
            .iter()
            .filter_map(|v| Member::of(v).map(|m| (v.id, m)))
            .collect();
        let updated = time(iterations.max(100_000), |i| {
            let (id, member) = &members[i as usize % members.len()];
            let mut busier = member.clone();
            busier.free = member.free.saturating_sub(1);
            live.upsert(*id, Some(busier));
            live.upsert(*id, Some(member.clone()));
        }) / 2.0;
        let feasible = time(iterations, |_| {
            black_box(feasibility(black_box(&job), &views).is_ok());
        });
        println!(
            "{n:>8} {scan:>12.0} {picked:>12.0} {indexed:>14.0} {updated:>14.0} {built:>12.0} {feasible:>12.0} {:>10.1}",
            picked / scan
        );
    }
}
