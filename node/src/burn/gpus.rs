//! Which CUDA devices a node uses and how its workers spread over them: pure decisions over the
//! number of devices the driver shows (after `CUDA_VISIBLE_DEVICES`), the operator's `GPUS` list
//! and the workers per device. The cuda backend asks the driver for the count and loads one
//! pipeline per entry of the plan; every job of a worker runs on that worker's device.

use crate::error::{NodeError, Result};

/// Most workers one device may hold (each holds a full copy of the model).
pub const MAX_WORKERS_PER_DEVICE: u32 = 8;

/// Parses `GPUS` (`"0,2"`, spaces allowed) into device indices, refusing empty entries,
/// non-numbers and repeats.
pub fn parse_gpu_list(text: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let index: usize = part.parse().map_err(|_| {
            NodeError::Config(format!(
                "GPUS={text}: {part:?} is not a device index (expected a list such as 0,2)"
            ))
        })?;
        if out.contains(&index) {
            return Err(NodeError::Config(format!(
                "GPUS={text}: device {index} is listed twice"
            )));
        }
        out.push(index);
    }
    Ok(out)
}

/// The device of each worker, in start order: every device of `chosen` (all `visible` devices
/// when `None`) gets `per_device` workers, interleaved so that the first workers land on
/// different devices.
pub fn plan_workers(
    visible: usize,
    chosen: Option<&[usize]>,
    per_device: u32,
) -> Result<Vec<usize>> {
    if visible == 0 {
        return Err(NodeError::Backend {
            backend: "cuda",
            message: "the CUDA driver shows no device (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
                .into(),
        });
    }
    if !(1..=MAX_WORKERS_PER_DEVICE).contains(&per_device) {
        return Err(NodeError::Config(format!(
            "NUM_WORKERS={per_device}: a cuda node runs 1..={MAX_WORKERS_PER_DEVICE} workers per device (each holds a full copy of the model)"
        )));
    }
    let devices: Vec<usize> = match chosen {
        None => (0..visible).collect(),
        Some([]) => {
            return Err(NodeError::Config(
                "GPUS is empty: name at least one device".into(),
            ));
        }
        Some(list) => {
            if let Some(bad) = list.iter().find(|&&i| i >= visible) {
                return Err(NodeError::Config(format!(
                    "GPUS names device {bad}, but the driver shows {visible} (indices 0..={}, counted after CUDA_VISIBLE_DEVICES)",
                    visible - 1
                )));
            }
            list.to_vec()
        }
    };
    Ok((0..per_device)
        .flat_map(|_| devices.iter().copied())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_lists_parse_and_refuse_nonsense_by_name() {
        assert_eq!(parse_gpu_list("0,2").unwrap(), vec![0, 2]);
        assert_eq!(parse_gpu_list(" 3 , 1 ").unwrap(), vec![3, 1]);
        for (bad, says) in [
            ("", "\"\" is not a device index"),
            ("0,,1", "\"\" is not a device index"),
            ("gpu0", "\"gpu0\" is not a device index"),
            ("-1", "\"-1\" is not a device index"),
            ("1,1", "device 1 is listed twice"),
        ] {
            let err = parse_gpu_list(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn every_device_gets_its_workers_interleaved() {
        assert_eq!(plan_workers(1, None, 1).unwrap(), vec![0]);
        assert_eq!(plan_workers(4, None, 1).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(plan_workers(2, None, 2).unwrap(), vec![0, 1, 0, 1]);
        assert_eq!(
            plan_workers(4, Some(&[0, 2]), 3).unwrap(),
            vec![0, 2, 0, 2, 0, 2]
        );
        assert_eq!(plan_workers(3, Some(&[2]), 1).unwrap(), vec![2]);
    }

    #[test]
    fn impossible_plans_are_refused_with_the_reason() {
        let cases: [(usize, Option<&[usize]>, u32, &str); 5] = [
            (0, None, 1, "shows no device"),
            (
                2,
                Some(&[0, 2]),
                1,
                "names device 2, but the driver shows 2",
            ),
            (2, Some(&[]), 1, "GPUS is empty"),
            (2, None, 0, "1..=8 workers per device"),
            (2, None, 9, "1..=8 workers per device"),
        ];
        for (visible, chosen, per, says) in cases {
            let err = plan_workers(visible, chosen, per).unwrap_err().to_string();
            assert!(err.contains(says), "{visible} {chosen:?} {per}: {err}");
        }
    }

    proptest::proptest! {
        /// Each chosen device runs exactly `per` workers, nothing else runs anywhere, and the
        /// first `devices` workers are on distinct devices.
        #[test]
        fn plans_are_balanced(visible in 1usize..9, mask in 1u16..512, per in 1u32..=8) {
            let chosen: Vec<usize> = (0..visible).filter(|i| mask & (1 << i) != 0).collect();
            proptest::prop_assume!(!chosen.is_empty());
            let plan = plan_workers(visible, Some(&chosen), per).unwrap();
            proptest::prop_assert_eq!(plan.len(), chosen.len() * per as usize);
            for d in 0..visible {
                let on = plan.iter().filter(|&&x| x == d).count();
                let want = if chosen.contains(&d) { per as usize } else { 0 };
                proptest::prop_assert_eq!(on, want);
            }
            let mut first: Vec<usize> = plan[..chosen.len()].to_vec();
            first.sort_unstable();
            first.dedup();
            proptest::prop_assert_eq!(first.len(), chosen.len());
        }
    }
}
