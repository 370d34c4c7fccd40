//! `gpumeter-agent probe`: what NVML sees on this machine — the cards, like `nvidia-smi -L`, and
//! which fields each one answers — as text for an operator or JSON for a script; with
//! `--kubelet-socket`, also what the kubelet's pod-resources API says about the cards.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use crate::gpu::GpuError;
use crate::gpu::nvml::{CardProbe, ProbeReport, Support, probe_cards};

/// Probes every card once through the NVML library at `lib_path` (default: the system's) and
/// formats the result. A missing library or driver is an error, for the caller to print.
pub fn probe(lib_path: Option<&Path>, json: bool) -> Result<String, GpuError> {
    probe_with(lib_path, json, None)
}

/// As [`probe`], and with `kubelet_socket` also what the kubelet's pod-resources API says:
/// whether it answers, which pod holds each card, the GPU devices it knows. Not to be called
/// from inside an async runtime (it runs its own for the kubelet's calls).
pub fn probe_with(
    lib_path: Option<&Path>,
    json: bool,
    kubelet_socket: Option<&Path>,
) -> Result<String, GpuError> {
    let report = probe_cards(lib_path)?;
    let kubelet = kubelet_socket.map(|socket| {
        let cards: Vec<_> = report.cards.iter().map(|c| c.info.clone()).collect();
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(crate::kubelet::probe_report(socket, &cards)),
            Err(e) => json!({
                "socket": socket.display().to_string(),
                "up": false,
                "error": format!("cannot start a runtime: {e}"),
            }),
        }
    });
    Ok(if json {
        let mut v = to_json(&report);
        if let Some(k) = kubelet {
            v["kubelet"] = k;
        }
        let mut out = format!("{v:#}");
        out.push('\n');
        out
    } else {
        let mut out = to_text(&report);
        if let Some(k) = &kubelet {
            write_kubelet(&mut out, k);
        }
        out
    })
}

fn write_kubelet(out: &mut String, k: &Value) {
    let socket = k["socket"].as_str().unwrap_or_default();
    if k["up"] != json!(true) {
        let _ = writeln!(
            out,
            "kubelet pod-resources {socket}: does not answer ({}); pods from cgroup paths only",
            k["error"].as_str().unwrap_or("unknown error")
        );
        return;
    }
    let _ = writeln!(
        out,
        "kubelet pod-resources {socket}: answers, {} pods",
        k["pods"]
    );
    if let Some(cards) = k["cards"].as_object() {
        for (uuid, c) in cards {
            let holders: Vec<&str> = c["holders"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let shared = if c["shared"] == json!(true) {
                " (shared)"
            } else {
                ""
            };
            let _ = writeln!(out, "    {uuid} -> {}{shared}", holders.join(", "));
        }
    }
    if let Some(unmapped) = k["unmapped"].as_array().filter(|a| !a.is_empty()) {
        let ids: Vec<&str> = unmapped.iter().filter_map(Value::as_str).collect();
        let _ = writeln!(out, "    devices naming no card here: {}", ids.join(", "));
    }
    match &k["allocatable"] {
        Value::Object(m) => {
            for (resource, ids) in m {
                let ids: Vec<&str> = ids
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let _ = writeln!(out, "    allocatable {resource}: {}", ids.join(", "));
            }
        }
        Value::String(s) => {
            let _ = writeln!(out, "    allocatable: {s}");
        }
        other => {
            let _ = writeln!(out, "    allocatable: {other}");
        }
    }
}

fn to_text(report: &ProbeReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "NVML library {} (driver {}, NVML {})",
        report.library,
        report.driver_version.as_deref().unwrap_or("unknown"),
        report.nvml_version.as_deref().unwrap_or("unknown"),
    );
    if report.cards.is_empty() {
        out.push_str("No GPUs found.\n");
    }
    for card in &report.cards {
        write_card(&mut out, card);
    }
    out
}

fn write_card(out: &mut String, card: &CardProbe) {
    let info = &card.info;
    if let Some(problem) = &card.problem {
        let _ = writeln!(out, "GPU {}: does not answer ({problem})", info.index);
        return;
    }
    let _ = writeln!(
        out,
        "GPU {}: {} (UUID: {})",
        info.index, info.name, info.uuid
    );
    let mut facts = Vec::new();
    if let Some(serial) = &info.serial {
        facts.push(format!("serial {serial}"));
    }
    if let Some(bus) = &info.pci_bus_id {
        facts.push(format!("pci {bus}"));
    }
    if let Some(total) = info.memory_total_bytes {
        facts.push(format!("memory {} MiB", total >> 20));
    }
    facts.push(match info.mig_enabled {
        Some(true) => "mig on".to_owned(),
        Some(false) => "mig off".to_owned(),
        None => "no mig".to_owned(),
    });
    let _ = writeln!(out, "    {}", facts.join(", "));
    for f in &card.fields {
        let (word, detail) = match &f.support {
            Support::Yes(detail) => ("yes", detail.as_str()),
            Support::No => ("no", ""),
            Support::Error(reason) => ("error", reason.as_str()),
        };
        let line = format!("    {:<20} {word:<5} {detail}", f.field);
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn to_json(report: &ProbeReport) -> Value {
    let cards: Vec<Value> = report
        .cards
        .iter()
        .map(|card| {
            let fields: serde_json::Map<String, Value> = card
                .fields
                .iter()
                .map(|f| {
                    let v = match &f.support {
                        Support::Yes(detail) => json!({ "supported": true, "detail": detail }),
                        Support::No => json!({ "supported": false }),
                        Support::Error(reason) => json!({ "supported": false, "error": reason }),
                    };
                    (f.field.replace(' ', "_"), v)
                })
                .collect();
            let info = &card.info;
            json!({
                "index": info.index,
                "uuid": info.uuid,
                "name": info.name,
                "serial": info.serial,
                "pci_bus_id": info.pci_bus_id,
                "memory_total_bytes": info.memory_total_bytes,
                "mig_enabled": info.mig_enabled,
                "problem": card.problem,
                "fields": fields,
            })
        })
        .collect();
    json!({
        "library": report.library,
        "driver_version": report.driver_version,
        "nvml_version": report.nvml_version,
        "cards": cards,
    })
}

#[cfg(test)]
mod kubelet_text_tests {
    use super::*;

    #[test]
    fn the_kubelets_answer_reads_as_lines() {
        let mut out = String::new();
        write_kubelet(
            &mut out,
            &json!({
                "socket": "/k.sock", "up": true, "pods": 3,
                "cards": {
                    "GPU-a": { "holders": ["ml/train/trainer"], "shared": false },
                    "GPU-b": { "holders": ["ml/s1/main", "ml/s2/main"], "shared": true },
                },
                "unmapped": ["nvidia.com/gpu=GPU-gone"],
                "allocatable": { "nvidia.com/gpu": ["GPU-a", "1"] },
            }),
        );
        assert_eq!(
            out,
            "kubelet pod-resources /k.sock: answers, 3 pods\n\
             \x20   GPU-a -> ml/train/trainer\n\
             \x20   GPU-b -> ml/s1/main, ml/s2/main (shared)\n\
             \x20   devices naming no card here: nvidia.com/gpu=GPU-gone\n\
             \x20   allocatable nvidia.com/gpu: GPU-a, 1\n"
        );
        let mut out = String::new();
        write_kubelet(
            &mut out,
            &json!({ "socket": "/k.sock", "up": true, "pods": 0, "cards": {}, "unmapped": [],
                     "allocatable": "not served by this kubelet" }),
        );
        assert!(
            out.ends_with("    allocatable: not served by this kubelet\n"),
            "{out}"
        );
    }
}
