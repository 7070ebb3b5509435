//! Hardware a device offers to workloads, scheduled like Kubernetes' extended resources
//! without a plugin protocol.
//!
//! An agent lists the device nodes it offers per class (`[devices.serial] paths = [...]` in
//! its config) and reports how many of each class it has in its hello. A workload asks for
//! some with `resources.devices: { serial: 1 }`; the scheduler places it only where that many
//! are free, and the agent hands the replica concrete nodes and takes them back when it
//! stops. The replica finds the nodes it got in `SHOAL_DEVICES_{CLASS}` ([`env_name`]),
//! comma-separated: a container sees each node at the same path, a WASM guest opens it through
//! the `shoal:device` host interface (see the agent's `runtime::wasm::devices`).

use crate::model::ids::DeviceClass;
use std::collections::BTreeMap;

/// Most device classes one device reports, or one workload asks for.
pub const MAX_CLASSES: usize = 16;
/// Most nodes of one class a device offers, or a replica asks for.
pub const MAX_PER_CLASS: u32 = 64;

/// How many nodes of each class a replica needs (`resources.devices`). Classes asked for
/// zero are left out.
pub type DeviceRequests = BTreeMap<DeviceClass, u32>;

/// Validates `resources.devices`: class names and counts, each problem naming its value.
pub fn validate_requests(
    field: &str,
    wire: &BTreeMap<String, i64>,
    errs: &mut Vec<String>,
) -> DeviceRequests {
    let mut out = DeviceRequests::new();
    if wire.len() > MAX_CLASSES {
        errs.push(format!(
            "{field}: {} device classes are too many: at most {MAX_CLASSES}",
            wire.len()
        ));
        return out;
    }
    for (class, count) in wire {
        let class = match DeviceClass::try_from(class.as_str()) {
            Ok(c) => c,
            Err(e) => {
                errs.push(format!("{field}: {e}"));
                continue;
            }
        };
        match u32::try_from(*count) {
            Ok(0) => {}
            Ok(n) if n <= MAX_PER_CLASS => {
                out.insert(class, n);
            }
            _ => errs.push(format!(
                "{field}.{class} {count} is invalid: must be 0-{MAX_PER_CLASS}"
            )),
        }
    }
    out
}

/// The environment variable that names a replica's nodes of `class`:
/// `SHOAL_DEVICES_SERIAL` for `serial`, `SHOAL_DEVICES_USB_CAMERA` for `usb-camera`.
pub fn env_name(class: &DeviceClass) -> String {
    format!(
        "SHOAL_DEVICES_{}",
        class.as_str().to_ascii_uppercase().replace('-', "_")
    )
}

/// Checks a device's report of its hardware (class → count): what a hello may carry.
pub fn check_counts(counts: &BTreeMap<String, u32>) -> Result<(), String> {
    if counts.len() > MAX_CLASSES {
        return Err(format!(
            "{} device classes are more than {MAX_CLASSES}",
            counts.len()
        ));
    }
    for (class, n) in counts {
        if let Err(e) = DeviceClass::try_from(class.as_str()) {
            return Err(e.to_string());
        }
        if *n > MAX_PER_CLASS {
            return Err(format!("{n} {class} devices are more than {MAX_PER_CLASS}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn requests_are_checked_value_by_value() {
        type Case<'a> = (&'a [(&'a str, i64)], &'a [&'a str], usize);
        let table: &[Case] = &[
            (&[("serial", 1), ("camera", 2)], &[], 2),
            (&[("serial", 0)], &[], 0),
            (
                &[("Serial", 1)],
                &["r: device class \"Serial\" is invalid: must contain only lowercase letters, digits and '-'"],
                0,
            ),
            (&[("serial", -1)], &["r.serial -1 is invalid: must be 0-64"], 0),
            (&[("serial", 65)], &["r.serial 65 is invalid: must be 0-64"], 0),
        ];
        for (input, want, n) in table {
            let mut errs = Vec::new();
            let got = validate_requests("r", &wire(input), &mut errs);
            assert_eq!(&errs, want, "{input:?}");
            assert_eq!(got.len(), *n, "{input:?}");
        }
        let many: Vec<(String, i64)> = (0..17).map(|i| (format!("c{i}"), 1)).collect();
        let mut errs = Vec::new();
        validate_requests("r", &many.into_iter().collect(), &mut errs);
        assert_eq!(errs, ["r: 17 device classes are too many: at most 16"]);
    }

    #[test]
    fn env_names_are_upper_case_with_underscores() {
        let c = DeviceClass::try_from("usb-camera").unwrap();
        assert_eq!(env_name(&c), "SHOAL_DEVICES_USB_CAMERA");
    }

    #[test]
    fn reported_counts_are_bounded() {
        let ok: BTreeMap<String, u32> = [("serial".to_string(), 2)].into();
        assert_eq!(check_counts(&ok), Ok(()));
        let bad: BTreeMap<String, u32> = [("se rial".to_string(), 2)].into();
        assert!(check_counts(&bad).unwrap_err().contains("\"se rial\""));
        let big: BTreeMap<String, u32> = [("serial".to_string(), 65)].into();
        assert!(check_counts(&big).unwrap_err().contains("65 serial"));
    }
}
