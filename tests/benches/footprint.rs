//! Agent footprint benchmark (issue 11): the CPU and peak memory of the real `gpumeter-agent`
//! binary metering `--cards` cards of the fake libnvidia-ml every second, against a bare
//! nvidia-ml-py (`pynvml`) loop reading the same fields of the same cards through the same
//! library, in the same run.
//!
//! Run with `cargo bench -p gpumeter-e2e --bench footprint [-- --quick]`. The baseline needs
//! Python with `pynvml` (`pip install nvidia-ml-py`); `--python` names the interpreter
//! (default: `GPUMETER_BENCH_PYTHON`, else `python3`). Without it only the agent's figures are
//! printed.
//!
//! The agent streams to an in-process collector over TLS on loopback, attributes the cards'
//! processes (real `sleep` processes, two per card) and spools every record, as in
//! production; only the agent's process is measured (`/proc/PID/stat` user + system time over
//! the measured span, after a warm-up, and `VmHWM`). Figures are printed with their targets
//! and PASS/FAIL, never asserted.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use gpumeter_e2e::{TestCollector, bin, target_dir};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// Cards on the fake driver.
    #[arg(long, default_value_t = 8)]
    cards: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 120)]
    secs: u64,
    /// Seconds before measuring (the agent's start, first windows).
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// 20 s measured after a 5 s warm-up.
    #[arg(long)]
    quick: bool,
    /// Seconds between scrapes of the agent's /metrics (per-card metrics on, as an operator
    /// runs it); 0 turns the endpoint off.
    #[arg(long, default_value_t = 15)]
    scrape_secs: u64,
    /// The agent binary to measure (default: the one built with the benchmark, which is
    /// rebuilt first). The packaged agent is built with `cargo build --profile agent -p
    /// gpumeter-agent`, at target/agent/gpumeter-agent.
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
    /// Python interpreter with pynvml for the baseline.
    #[arg(long)]
    python: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const GIB: u64 = 1 << 30;

/// What /proc says of a process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu_ticks: u64,
}

fn usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(Usage {
        cpu_ticks: utime + stime,
    })
}

/// Peak resident set (VmHWM), bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Measures `pid` over `secs` after `warmup`: (share of one core, peak RSS).
fn measure(child: &mut Child, warmup: u64, secs: u64) -> anyhow::Result<(f64, u64)> {
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(warmup));
    if let Some(s) = child.try_wait()? {
        bail!("process {pid} exited during the warm-up: {s}");
    }
    let (a, t0) = (usage(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    if let Some(s) = child.try_wait()? {
        bail!("process {pid} exited while measured: {s}");
    }
    let (b, span) = (usage(pid)?, t0.elapsed());
    let cpu = (b.cpu_ticks - a.cpu_ticks) as f64 / clock_ticks() as f64 / span.as_secs_f64();
    Ok((cpu, peak_rss(pid)?))
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn scenario(cards: usize, pids: &[u32]) -> Value {
    let cards: Vec<Value> = (0..cards)
        .map(|i| {
            json!({
                "uuid": format!("GPU-f0f0f0f0-0000-4000-8000-{i:012x}"),
                "name": "NVIDIA H100 80GB HBM3",
                "serial": format!("16501234{i:05}"),
                "pci_bus_id": format!("00000000:{:02x}:00.0", 0x17 + i),
                "memory_total": 80 * GIB,
                "util_gpu": 40 + i as u64, "util_mem": 12,
                "memory_used": 8 * GIB,
                "power_mw": 250_000, "energy_mj": 1_000_000 + i as u64,
                "temperature_c": 61, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
                "sample_period_us": 1_000_000,
                "processes": [
                    { "pid": pids[2 * i], "used_memory": GIB, "sm_util": 30 },
                    { "pid": pids[2 * i + 1], "used_memory": GIB / 2, "sm_util": 10 }
                ]
            })
        })
        .collect();
    json!({ "driver_version": "550.54.15", "cards": cards })
}

/// The bare loop: every second, for every card, the fields the agent samples.
const PYNVML_LOOP: &str = r#"
import sys, time
import pynvml as n
n.nvmlInit()
handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(n.nvmlDeviceGetCount())]
calls = [
    n.nvmlDeviceGetUtilizationRates,
    lambda h: n.nvmlDeviceGetMemoryInfo(h, version=n.nvmlMemory_v2),
    n.nvmlDeviceGetPowerUsage,
    n.nvmlDeviceGetTotalEnergyConsumption,
    lambda h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
    lambda h: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
    lambda h: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
    n.nvmlDeviceGetCurrentClocksThrottleReasons,
    n.nvmlDeviceGetComputeRunningProcesses,
    n.nvmlDeviceGetGraphicsRunningProcesses,
    lambda h: n.nvmlDeviceGetProcessUtilization(h, 0),
]
print("ready", len(handles), flush=True)
while True:
    t = time.monotonic()
    for h in handles:
        for c in calls:
            try:
                c(h)
            except n.NVMLError:
                pass
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
"#;

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.secs = args.secs.min(20);
        args.warmup = args.warmup.min(5);
    }
    if args.cards == 0 || args.secs == 0 {
        bail!("--cards and --secs must be at least 1");
    }
    let built = bin("gpumeter-agent");
    let agent_bin = args.agent.clone().unwrap_or(built);
    let dir = tempfile::tempdir()?;
    let lib_dir = dir.path().join("driver");
    fs::create_dir_all(&lib_dir)?;
    fs::copy(
        target_dir().join("libnvidia_ml.so"),
        lib_dir.join("libnvidia-ml.so.1"),
    )
    .context("the fake libnvidia-ml (built with the binaries)")?;
    let mut sleepers = Killed(Vec::new());
    for _ in 0..2 * args.cards {
        sleepers
            .0
            .push(Command::new("sleep").arg("100000").spawn()?);
    }
    let pids: Vec<u32> = sleepers.0.iter().map(Child::id).collect();
    fs::write(
        lib_dir.join("fake-nvml-scenario.json"),
        serde_json::to_vec_pretty(&scenario(args.cards, &pids))?,
    )?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let collector = rt.block_on(TestCollector::start(&dir.path().join("ledger.db")))?;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let metrics = if args.scrape_secs > 0 {
        format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n")
    } else {
        String::new()
    };
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        format!(
            r#"agent_id = "footprint"
csp = "kt"
state_dir = "{state}"
{metrics}
[collector]
url = "{url}"
{tls}
[sampling]
interval_ms = 1000
window_ms = 60000

[source]
kind = "nvml-lib"
path = "{lib}"
"#,
            state = dir.path().join("state").display(),
            url = collector.url,
            tls = gpumeter_e2e::agent_tls_toml("footprint", "footprint", &dir.path().join("tls")),
            lib = lib_dir.join("libnvidia-ml.so.1").display(),
        ),
    )?;
    println!("gpumeter agent footprint benchmark (issue 11)");
    println!("  agent: {}", agent_bin.display());
    println!(
        "  {} cards of the fake libnvidia-ml, two processes each, sampled every 1 s, 60 s windows; {} s warm-up, {} s measured",
        args.cards, args.warmup, args.secs
    );
    if args.scrape_secs > 0 {
        println!(
            "  per-card metrics on: /metrics scraped every {} s",
            args.scrape_secs
        );
    }
    let log = dir.path().join("agent.log");
    let agent = Command::new(&agent_bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .env_remove("GPUMETER_FAKE_NVML_SCENARIO")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    let mut agent = Killed(vec![agent]);
    let scraping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let scraper = (args.scrape_secs > 0).then(|| {
        let scraping = std::sync::Arc::clone(&scraping);
        let every = Duration::from_secs(args.scrape_secs);
        std::thread::spawn(move || scrape_until(metrics_port, every, &scraping))
    });
    let (agent_cpu, agent_rss) =
        measure(&mut agent.0[0], args.warmup, args.secs).with_context(|| {
            format!(
                "agent log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
    scraping.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(scraper) = scraper {
        let (ok, failed) = scraper.join().expect("the scraper thread");
        println!("  scrapes of /metrics: {ok} with per-card series, {failed} failed");
        if ok == 0 {
            bail!("the agent's /metrics never answered with per-card series");
        }
    }
    drop(agent);

    let python = args
        .python
        .clone()
        .or_else(|| std::env::var("GPUMETER_BENCH_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let baseline = baseline(&python, &lib_dir, args.warmup, args.secs);
    rt.block_on(collector.stop())?;

    let row = |what: &str, value: String, target: &str, pass: Option<bool>| {
        let result = match pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "",
        };
        println!("  {what:<52} {value:>14}  {target:<14} {result}");
    };
    println!(
        "  {:<52} {:>14}  {:<14} result",
        "measure", "value", "target"
    );
    row(
        "agent cpu, share of one core",
        format!("{:.3} %", agent_cpu * 100.0),
        "< 0.5 %",
        Some(agent_cpu < 0.005),
    );
    row(
        "agent peak RSS (VmHWM)",
        format!("{:.1} MiB", agent_rss as f64 / (1 << 20) as f64),
        "< 10 MiB",
        Some(agent_rss < 10 << 20),
    );
    match baseline {
        Ok((cpu, rss)) => {
            row(
                "baseline: pynvml loop, share of one core",
                format!("{:.3} %", cpu * 100.0),
                "",
                None,
            );
            row(
                "baseline: pynvml loop peak RSS",
                format!("{:.1} MiB", rss as f64 / (1 << 20) as f64),
                "",
                None,
            );
            let ratio = agent_cpu / cpu.max(f64::MIN_POSITIVE);
            row(
                "ratio agent cpu / baseline cpu",
                format!("{ratio:.2}"),
                "<= 3",
                Some(ratio <= 3.0),
            );
        }
        Err(e) => println!("  baseline: not run ({e:#})"),
    }
    println!(
        "  load average at the end: {}",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    Ok(())
}

/// Scrapes `/metrics` on `port` every `every` while `on` holds, as Prometheus would: (scrapes
/// that carried per-card series, scrapes that failed).
fn scrape_until(port: u16, every: Duration, on: &std::sync::atomic::AtomicBool) -> (u64, u64) {
    use std::io::{Read, Write};
    let once = || -> std::io::Result<bool> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body.starts_with("HTTP/1.1 200") && body.contains("gpumeter_gpu_utilization_ratio{"))
    };
    let (mut ok, mut failed) = (0, 0);
    let mut next = Instant::now() + every;
    while on.load(std::sync::atomic::Ordering::Relaxed) {
        if Instant::now() >= next {
            match once() {
                Ok(true) => ok += 1,
                _ => failed += 1,
            }
            next += every;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (ok, failed)
}

/// Runs the pynvml loop on the same library and measures it like the agent.
fn baseline(python: &str, lib_dir: &Path, warmup: u64, secs: u64) -> anyhow::Result<(f64, u64)> {
    let check = Command::new(python)
        .args(["-c", "import pynvml"])
        .output()
        .with_context(|| format!("{python} cannot be run"))?;
    if !check.status.success() {
        bail!("{python} has no pynvml (pip install nvidia-ml-py)");
    }
    let mut child = Command::new(python)
        .args(["-c", PYNVML_LOOP])
        .env("LD_LIBRARY_PATH", lib_dir)
        .env_remove("GPUMETER_FAKE_NVML_SCENARIO")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    {
        use std::io::BufRead;
        let out = child.stdout.take().context("no stdout")?;
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    if !line.starts_with("ready") {
        let _ = child.kill();
        let out = child.wait_with_output()?;
        bail!(
            "the pynvml loop did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut child = Killed(vec![child]);
    measure(&mut child.0[0], warmup, secs)
}
