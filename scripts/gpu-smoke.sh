#!/usr/bin/env bash
# gpu-smoke.sh: runs the prebuilt gpumeter-agent against the real NVIDIA driver, with a
# gpumeter-collector on loopback, puts a small PyTorch load on one GPU and compares the agent's
# windows with nvidia-smi and pynvml over the same spans. Needs no Rust toolchain: bash,
# python3 (its sqlite3 module) and the two binaries; nvidia-smi, pynvml and PyTorch are used when
# present and their parts are skipped, with a note, when not.
#
# Read-only towards the GPU: it never changes compute mode, persistence mode, clocks, power
# limits, MIG or ECC mode and never resets a card (no nvidia-smi -pm/-c/-pl/-r/-lgc/-mig or
# the like: only --query-* calls). The agent runs with enforcement mode "observe" and
# lock_unassigned = false, so it only records and never signals a process or sets a mode.
#
# Usage: scripts/gpu-smoke.sh [--bin-dir DIR] [--nvml-lib PATH] [--gpu INDEX]
#                             [--load-seconds N] [--keep]
#   --bin-dir DIR      where gpumeter-agent and gpumeter-collector are (./target/release)
#   --nvml-lib PATH    NVML library for the agent and its probe (default: the system's); a
#                      fake libnvidia-ml (tests/fake-nvml) lets the flow run without a GPU
#   --gpu INDEX        NVML index of the card to load and compare (0)
#   --load-seconds N   how long the PyTorch load runs (40)
#   --keep             keep the work directory (its path is printed)
# Output: a markdown summary on stdout (progress goes to stderr), also written to
# $OUT_DIR/gpu-validation.md with the raw samples and logs under $OUT_DIR/gpu-smoke/ when
# OUT_DIR is set. Typically about 90 s; a watchdog ends the run after MAX_SECONDS (180).
# Exit status: 0 when the agent delivered windows for the card, 1 otherwise, 2 on bad usage.
set -euo pipefail

BIN_DIR=./target/release
NVML_LIB=""
GPU=0
LOAD_SECONDS=40
KEEP=0
MAX_SECONDS=${MAX_SECONDS:-180}
INTERVAL_MS=1000
WINDOW_MS=10000
# Windows to wait for after the load ends, so idle windows are compared too.
TAIL_WINDOWS=2

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR=${2:?--bin-dir needs a directory}; shift 2 ;;
    --nvml-lib) NVML_LIB=${2:?--nvml-lib needs a path}; shift 2 ;;
    --gpu) GPU=${2:?--gpu needs an index}; shift 2 ;;
    --load-seconds) LOAD_SECONDS=${2:?--load-seconds needs a number}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$GPU$LOAD_SECONDS" in
  *[!0-9]*) echo "gpu-smoke: --gpu and --load-seconds take whole numbers" >&2; exit 2 ;;
esac

log() { printf '[gpu-smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now_ms() { python3 -c 'import time; print(int(time.time() * 1000))'; }

AGENT=$BIN_DIR/gpumeter-agent
COLLECTOR=$BIN_DIR/gpumeter-collector
[ -x "$AGENT" ] || die "no executable $AGENT (build with cargo build --release, or pass --bin-dir)"
[ -x "$COLLECTOR" ] || die "no executable $COLLECTOR"
command -v python3 >/dev/null || die "python3 is needed (for the report and its sqlite3 module)"
python3 -c 'import sqlite3' 2>/dev/null || die "python3 lacks the sqlite3 module"
if [ -n "$NVML_LIB" ] && [ ! -e "$NVML_LIB" ]; then die "no NVML library at $NVML_LIB"; fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpumeter-smoke.XXXXXX")
WATCHDOG=""

# Our background processes that are still unreaped: only these are ever signalled, and a pid
# leaves the list once reaped, so a recycled pid is never hit.
PIDS=()
forget() {
  local keep=() pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  PIDS=(${keep[@]+"${keep[@]}"})
}

# Called only through the EXIT trap, which shellcheck cannot see.
# shellcheck disable=SC2317
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid alive
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    alive=0
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.3
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$WATCHDOG" ]; then kill -TERM "$WATCHDOG" 2>/dev/null || true; wait "$WATCHDOG" 2>/dev/null || true; fi
  if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 1' INT TERM

# Whatever happens, the run ends: the watchdog signals this shell, whose trap cleans up. Stopped
# early, it takes its sleep with it.
(
  sleep "$MAX_SECONDS" &
  sp=$!
  trap 'kill "$sp" 2>/dev/null; exit 0' TERM
  if wait "$sp"; then
    echo "[gpu-smoke] watchdog: over ${MAX_SECONDS}s, stopping" >&2
    kill -TERM $$
  fi
) &
WATCHDOG=$!

# Starts a background command, remembered for cleanup; its pid is in $BG_PID.
bg() { "$@" & BG_PID=$!; PIDS+=("$BG_PID"); }
# Stops and reaps one background process started by bg: SIGTERM, SIGKILL after $2 seconds.
stop_pid() {
  local pid=$1 grace=${2:-5} i=0
  if kill -TERM "$pid" 2>/dev/null; then
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt $((grace * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

# Sleeps in the background and waits for it: a signal (the watchdog's) interrupts `wait` at
# once, while a foreground sleep would hold the trap back until it ends.
nap() {
  sleep "$1" &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid" || true
  forget "$pid"
}

NVML_ARGS=()
if [ -n "$NVML_LIB" ]; then NVML_ARGS=(--nvml-lib "$NVML_LIB"); fi

# ---- what is there ----
HAVE_SMI=0; HAVE_SMI_ENERGY=0
if command -v nvidia-smi >/dev/null 2>&1; then HAVE_SMI=1; fi
HAVE_PYNVML=0
python3 -c 'import pynvml' >/dev/null 2>&1 && HAVE_PYNVML=1
log "work directory $WORK"

# ---- probe ----
log "gpumeter-agent probe ${NVML_ARGS[*]+${NVML_ARGS[*]}}"
set +e
"$AGENT" probe ${NVML_ARGS[@]+"${NVML_ARGS[@]}"} >"$WORK/probe.txt" 2>"$WORK/probe.err"
PROBE_RC=$?
"$AGENT" probe ${NVML_ARGS[@]+"${NVML_ARGS[@]}"} --json >"$WORK/probe.json" 2>>"$WORK/probe.err"
set -e
cat "$WORK/probe.txt" >&2
if [ "$PROBE_RC" != 0 ]; then
  cat "$WORK/probe.err" >&2
  die "gpumeter-agent probe failed (exit $PROBE_RC): no NVML to meter"
fi
UUID=$(python3 - "$WORK/probe.json" "$GPU" <<'PY'
import json, sys
cards = json.load(open(sys.argv[1])).get("cards", [])
idx = int(sys.argv[2])
match = [c for c in cards if c.get("index") == idx and c.get("uuid")]
print(match[0]["uuid"] if match else "")
PY
)
[ -n "$UUID" ] || die "NVML shows no card with index $GPU (see the probe above)"
log "card $GPU is $UUID"

if [ "$HAVE_SMI" = 1 ]; then
  # Not every nvidia-smi knows an energy field; without it energy is power.draw integrated.
  # (Outputs are captured, not piped into grep -q: under pipefail, nvidia-smi dying of SIGPIPE
  # after grep has seen enough would read as "no".)
  QUERY_HELP=$(nvidia-smi --help-query-gpu 2>/dev/null || true)
  case $QUERY_HELP in
    *total_energy_consumption*)
      ENERGY_NOW=$(nvidia-smi --id="$UUID" --query-gpu=total_energy_consumption \
        --format=csv,noheader,nounits 2>/dev/null || true)
      if [[ $ENERGY_NOW =~ ^[[:space:]]*[0-9.]+[[:space:]]*$ ]]; then
        HAVE_SMI_ENERGY=1
      fi
      ;;
  esac
  nvidia-smi --query-gpu=index,uuid,name,driver_version,memory.total --format=csv >"$WORK/smi-inventory.csv" 2>&1 || true
fi

# ---- collector ----
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
log "starting gpumeter-collector on 127.0.0.1:$PORT"
bg "$COLLECTOR" serve --listen "127.0.0.1:$PORT" --db "$WORK/ledger.db" 2>"$WORK/collector.log"
COLLECTOR_PID=$BG_PID
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  kill -0 "$COLLECTOR_PID" 2>/dev/null || { cat "$WORK/collector.log" >&2; die "the collector exited"; }
  sleep 0.1
done

# ---- agent ----
if [ -n "$NVML_LIB" ]; then
  SOURCE=$(printf 'kind = "nvml-lib"\npath = "%s"' "$NVML_LIB")
else
  SOURCE='kind = "nvml"'
fi
cat >"$WORK/agent.toml" <<EOF
# Written by scripts/gpu-smoke.sh.
agent_id = "gpu-smoke"
csp = "smoke-test"
state_dir = "$WORK/state"

[collector]
url = "http://127.0.0.1:$PORT"

[sampling]
interval_ms = $INTERVAL_MS
window_ms = $WINDOW_MS

[source]
$SOURCE

# Record only: never signal a process, never set a compute mode.
[enforcement]
mode = "observe"
lock_unassigned = false
EOF
log "starting gpumeter-agent (interval ${INTERVAL_MS} ms, window ${WINDOW_MS} ms, observe only)"
bg "$AGENT" run --config "$WORK/agent.toml" 2>"$WORK/agent.log"
AGENT_PID=$BG_PID
agent_cards() {
  python3 - "$WORK/ledger.db" <<'PY' 2>/dev/null || echo 0
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(c.execute("SELECT COUNT(*) FROM gpus WHERE agent_id = 'gpu-smoke'").fetchone()[0])
PY
}
for _ in $(seq 1 200); do
  [ "$(agent_cards)" -gt 0 ] && break
  kill -0 "$AGENT_PID" 2>/dev/null || { tail -n 30 "$WORK/agent.log" >&2; die "the agent exited"; }
  sleep 0.1
done
[ "$(agent_cards)" -gt 0 ] || { tail -n 30 "$WORK/agent.log" >&2; die "the agent never reached the collector"; }
log "the agent is connected"

# ---- reference samplers ----
cat >"$WORK/sampler.py" <<'PY'
"""Samples the card through pynvml (every second) and nvidia-smi's compute-app list (every
two seconds) into JSON lines, until killed. Read-only NVML calls only."""
import json, os, pwd, shutil, subprocess, sys, time

out_path, uuid, use_smi = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
out = open(out_path, "a", buffering=1)

def emit(rec):
    rec["t"] = int(time.time() * 1000)
    out.write(json.dumps(rec) + "\n")

def user_of(pid):
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None, None
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, None

nv = handle = None
try:
    import pynvml as nv
    nv.nvmlInit()
    try:
        handle = nv.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        handle = nv.nvmlDeviceGetHandleByUUID(uuid.encode())
except Exception as e:
    emit({"src": "pynvml", "error": f"{type(e).__name__}: {e}"})
    handle = None

def field(f):
    try:
        return f()
    except Exception:
        return None

tick = 0
while True:
    if handle is not None:
        u = field(lambda: nv.nvmlDeviceGetUtilizationRates(handle))
        m = field(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
        procs = field(lambda: nv.nvmlDeviceGetComputeRunningProcesses(handle)) or []
        emit({
            "src": "pynvml",
            "util": u.gpu if u else None,
            "mem_util": u.memory if u else None,
            "mem_used": m.used if m else None,
            "power_mw": field(lambda: nv.nvmlDeviceGetPowerUsage(handle)),
            "energy_mj": field(lambda: nv.nvmlDeviceGetTotalEnergyConsumption(handle)),
            "procs": [{"pid": p.pid, "used": p.usedGpuMemory} for p in procs],
        })
    if use_smi and tick % 2 == 0:
        try:
            text = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
                 "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10).stdout
            apps = []
            for line in text.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) < 4 or not parts[1].isdigit():
                    continue
                uid, user = user_of(int(parts[1]))
                apps.append({"uuid": parts[0], "pid": int(parts[1]), "name": parts[2],
                             "used_mib": parts[3], "uid": uid, "user": user})
            emit({"src": "smi-apps", "apps": apps})
        except Exception as e:
            emit({"src": "smi-apps", "error": f"{type(e).__name__}: {e}"})
    tick += 1
    time.sleep(1.0)
PY

if [ "$HAVE_SMI" = 1 ]; then
  SMI_FIELDS=timestamp,uuid,utilization.gpu,utilization.memory,memory.used,power.draw
  [ "$HAVE_SMI_ENERGY" = 1 ] && SMI_FIELDS=$SMI_FIELDS,total_energy_consumption
  echo "$SMI_FIELDS" >"$WORK/smi-gpu.csv"
  bg nvidia-smi --id="$UUID" --query-gpu="$SMI_FIELDS" --format=csv,noheader,nounits -lms 1000 \
    >>"$WORK/smi-gpu.csv" 2>"$WORK/smi-gpu.err"
  SMI_PID=$BG_PID
else
  log "nvidia-smi not found: its columns stay empty"
  SMI_PID=""
fi
if [ "$HAVE_SMI" = 1 ] || [ "$HAVE_PYNVML" = 1 ]; then
  bg python3 "$WORK/sampler.py" "$WORK/samples.jsonl" "$UUID" "$HAVE_SMI"
  SAMPLER_PID=$BG_PID
else
  SAMPLER_PID=""
fi

# ---- load ----
cat >"$WORK/load.py" <<'PY'
"""A modest CUDA load on the one visible GPU: matrix products, first at full duty, then busy
half of every 200 ms, so the windows show two utilization levels. Writes what it did to a JSON
file; without PyTorch or CUDA it says why and exits 0."""
import json, os, sys, time

out, seconds = sys.argv[1], float(sys.argv[2])
def done(rec):
    with open(out, "w") as f:
        json.dump(rec, f)

try:
    import torch
except Exception as e:
    done({"ok": False, "reason": f"PyTorch is not importable ({type(e).__name__}: {e})"})
    sys.exit(0)
if not torch.cuda.is_available():
    done({"ok": False, "reason": "torch.cuda.is_available() is False"})
    sys.exit(0)
dev = torch.device("cuda:0")
n = 4096  # three 64 MiB fp32 matrices
a = torch.randn(n, n, device=dev)
b = torch.randn(n, n, device=dev)
c = a @ b
torch.cuda.synchronize()  # cuBLAS initialized before the clock starts
start = time.time()
half = start + seconds / 2
phases = []
iters = 0
while time.time() - start < seconds:
    now = time.time()
    duty = 1.0 if now < half else 0.5
    period_end = now + 0.2
    busy_end = now + 0.2 * duty
    while time.time() < busy_end:
        c = a @ b
        torch.cuda.synchronize()
        iters += 1
    rest = period_end - time.time()
    if rest > 0:
        time.sleep(rest)
end = time.time()
done({
    "ok": True, "pid": os.getpid(), "uid": os.getuid(),
    "start_ms": int(start * 1000), "half_ms": int(half * 1000), "end_ms": int(end * 1000),
    "iterations": iters, "torch": torch.__version__,
    "device": torch.cuda.get_device_name(0),
    "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
})
PY

# PyTorch on exactly the card under test: CUDA's own order may differ from NVML's.
log "starting the load on $UUID for ${LOAD_SECONDS}s"
LOAD_T0=$(now_ms)
bg env CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$UUID" \
  python3 "$WORK/load.py" "$WORK/load.json" "$LOAD_SECONDS" 2>"$WORK/load.err"
LOAD_PID=$BG_PID
wait "$LOAD_PID" || log "the load exited with status $?"
forget "$LOAD_PID"
LOAD_OK=$(python3 -c 'import json,sys; print(1 if json.load(open(sys.argv[1])).get("ok") else 0)' "$WORK/load.json" 2>/dev/null || echo 0)
if [ "$LOAD_OK" != 1 ]; then
  log "no GPU load: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("reason",""))' "$WORK/load.json" 2>/dev/null || tail -n 3 "$WORK/load.err")"
  # Still meter the same span, idle, so the comparison has windows.
  elapsed=$(( ($(now_ms) - LOAD_T0) / 1000 ))
  if [ "$elapsed" -lt "$LOAD_SECONDS" ]; then nap $((LOAD_SECONDS - elapsed)); fi
fi
LOAD_END=$(now_ms)

# ---- a couple of idle windows, then stop ----
WAIT_UNTIL=$(( (LOAD_END / WINDOW_MS + 1 + TAIL_WINDOWS) * WINDOW_MS + 1500 ))
log "waiting for $TAIL_WINDOWS more windows ($(( (WAIT_UNTIL - $(now_ms)) / 1000 ))s)"
while [ "$(now_ms)" -lt "$WAIT_UNTIL" ]; do
  kill -0 "$AGENT_PID" 2>/dev/null || break
  sleep 1
done
if [ -n "$SAMPLER_PID" ]; then stop_pid "$SAMPLER_PID" 3; fi
if [ -n "$SMI_PID" ]; then stop_pid "$SMI_PID" 3; fi
AGENT_RC=0
if kill -0 "$AGENT_PID" 2>/dev/null; then
  kill -TERM "$AGENT_PID"
  for _ in $(seq 1 150); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$AGENT_PID" 2>/dev/null; then
    log "the agent ignored SIGTERM for 15 s"
    kill -KILL "$AGENT_PID"
  fi
  wait "$AGENT_PID" || AGENT_RC=$?
else
  wait "$AGENT_PID" || AGENT_RC=$?
  log "the agent had exited early (status $AGENT_RC)"
fi
forget "$AGENT_PID"
# The collector commits what the agent sent last before the report reads the ledger.
sleep 1

# ---- report ----
cat >"$WORK/report.py" <<'PY'
"""Markdown report: the agent's windows (from the collector's SQLite ledger) beside nvidia-smi
and pynvml over the same spans, and the processes each saw."""
import csv, datetime as dt, json, os, pwd, re, sqlite3, sys

work, uuid = sys.argv[1], sys.argv[2]
env = os.environ
meta = {
    "window_ms": int(env["SMOKE_WINDOW_MS"]), "interval_ms": int(env["SMOKE_INTERVAL_MS"]),
    "gpu": int(env["SMOKE_GPU"]), "nvml_lib": env.get("SMOKE_NVML_LIB", ""),
    "have_smi": env.get("SMOKE_HAVE_SMI") == "1",
    "have_smi_energy": env.get("SMOKE_HAVE_SMI_ENERGY") == "1",
    "agent_rc": env.get("SMOKE_AGENT_RC", "?"), "user": env.get("SMOKE_USER", "?"),
    "agent_version": env.get("SMOKE_AGENT_VERSION", "?").strip(),
}
W = meta["window_ms"]

def load_json(name, default=None):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except Exception:
        return default

def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None

def fmt(v, nd=1):
    return "–" if v is None else f"{v:.{nd}f}"

def hms(ms):
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%H:%M:%S")

db = sqlite3.connect(os.path.join(work, "ledger.db"))
windows = db.execute(
    "SELECT seq, start_ms, end_ms, expected_samples, good_samples, health, util_avg_pct,"
    " util_max_pct, memory_used_max_bytes, energy_mj, energy_estimated, power_avg_w,"
    " temperature_max_c, unavailable_ms FROM windows WHERE agent_id = 'gpu-smoke'"
    " AND gpu_uuid = ? ORDER BY start_ms", (uuid,)).fetchall()
principals = {}
for seq, label, uid, occ, mem, n in db.execute(
        "SELECT seq, principal, uid, occupied_ms, memory_max_bytes, process_count"
        " FROM window_principals WHERE agent_id = 'gpu-smoke' ORDER BY seq, principal"):
    principals.setdefault(seq, []).append((label, uid, occ, mem, n))
others = db.execute(
    "SELECT gpu_uuid, idx, name, memory_total_bytes FROM gpus WHERE agent_id = 'gpu-smoke'"
    " ORDER BY idx").fetchall()
events = db.execute(
    "SELECT kind, COUNT(*) FROM events WHERE agent_id = 'gpu-smoke' GROUP BY kind"
    " ORDER BY kind").fetchall()

# nvidia-smi --query-gpu rows; its timestamp is local time.
smi = []
try:
    with open(os.path.join(work, "smi-gpu.csv")) as f:
        rows = list(csv.reader(f))
    head = rows[0]
    for r in rows[1:]:
        rec = dict(zip(head, (x.strip() for x in r)))
        try:
            t = dt.datetime.strptime(rec["timestamp"], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        except (KeyError, ValueError):
            continue
        smi.append({"t": int(t * 1000), "util": num(rec.get("utilization.gpu")),
                    "mem_mib": num(rec.get("memory.used")), "power_w": num(rec.get("power.draw")),
                    "energy_mj": num(rec.get("total_energy_consumption"))})
except (OSError, IndexError):
    pass

pyn, apps, pyn_error, apps_error = [], [], None, None
try:
    with open(os.path.join(work, "samples.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["src"] == "pynvml":
                if "error" in rec:
                    pyn_error = rec["error"]
                else:
                    pyn.append(rec)
            elif rec["src"] == "smi-apps":
                if "error" in rec:
                    apps_error = rec["error"]
                else:
                    apps.append(rec)
except OSError:
    pass

def within(series, start, end):
    return [s for s in series if start < s["t"] <= end]

def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None

def at(series, key, t):
    """The counter `key` at time t, interpolated between the samples around it."""
    pts = [(s["t"], s[key]) for s in series if s.get(key) is not None]
    before = [p for p in pts if p[0] <= t]
    after = [p for p in pts if p[0] >= t]
    if not before or not after:
        return None
    (t0, v0), (t1, v1) = before[-1], after[0]
    return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)

def delta(series, key, start, end):
    a, b = at(series, key, start), at(series, key, end)
    return None if a is None or b is None else b - a

load = load_json("load.json", {}) or {}
meta["load_user"] = None
if load.get("ok"):
    try:
        meta["load_user"] = pwd.getpwuid(load["uid"]).pw_name
    except KeyError:
        pass
probe = load_json("probe.json", {}) or {}
card = next((c for c in probe.get("cards", []) if c.get("uuid") == uuid), {})

out = []
p = out.append
p("# gpumeter GPU smoke test")
p("")
p(f"- Run: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} UTC on "
  f"`{os.uname().nodename}`, as `{meta['user']}`; agent `{meta['agent_version']}`")
lib = meta["nvml_lib"] or "the system's libnvidia-ml.so.1"
p(f"- NVML: {lib}; driver {probe.get('driver_version', '?')}, NVML {probe.get('nvml_version', '?')}")
if meta["nvml_lib"]:
    p(f"- **The agent read `{meta['nvml_lib']}`, not necessarily the driver nvidia-smi and pynvml "
      "read**: with a fake library the two sides describe different cards.")
p(f"- Card under test: index {meta['gpu']}, {card.get('name', '?')}, `{uuid}`")
p(f"- Windows: {W // 1000} s, samples every {meta['interval_ms'] // 1000} s; enforcement observe, "
  "lock_unassigned off")
if meta["have_smi"]:
    how = ("its total_energy_consumption counter" if meta["have_smi_energy"]
           else "≈ its power.draw average × window length (no energy field in this nvidia-smi)")
    p(f"- nvidia-smi: sampled every 1 s; energy from {how}")
else:
    p("- nvidia-smi: **not found**, its columns are empty")
if pyn:
    p("- pynvml: sampled every 1 s (utilization rates, memory, power, the energy counter)")
elif pyn_error:
    p(f"- pynvml: could not start ({pyn_error})")
else:
    p("- pynvml: **not importable**, its columns are empty")
if load.get("ok"):
    p(f"- Load: PyTorch {load['torch']} on {load['device']}, pid {load['pid']} "
      f"(user `{meta['load_user'] or '?'}`, uid {load['uid']}), {hms(load['start_ms'])}–"
      f"{hms(load['end_ms'])} UTC: full duty until {hms(load['half_ms'])}, then 50 % duty; "
      f"{load['iterations']} 4096² fp32 products, peak {load['peak_allocated_bytes'] / 2**20:.0f} MiB allocated")
else:
    p(f"- Load: **none**: {load.get('reason', 'the load did not report')}")
p(f"- Agent exit status after SIGTERM: {meta['agent_rc']}")
p("")
p("## Probe")
p("")
p("```text")
p(open(os.path.join(work, "probe.txt")).read().rstrip())
p("```")
p("")
p("<details><summary>probe --json</summary>")
p("")
p("```json")
p(open(os.path.join(work, "probe.json")).read().rstrip())
p("```")
p("")
p("</details>")
p("")
p("Cards the agent reported: " + ", ".join(
    f"{i}: {n} `{u}` ({'–' if m is None else m // 2**20} MiB)" for u, i, n, m in others))
p("")
p("## Windows")
p("")
p("Each agent window `(start, end]` beside the reference samples taken in the same span. "
  "Utilization in %, memory in MiB, energy in J, power in W. smi = nvidia-smi, nvml = pynvml; "
  "≈: estimated from power. load: the load phase that overlapped the window (full duty, half "
  "duty or both) and for how much of the window.")
p("")
p("| window (UTC) | good/exp | health | util agent | util smi | util nvml | mem max agent | mem max smi "
  "| energy agent | energy smi | energy nvml | power agent | power smi | load |")
p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
diffs_util, diffs_energy = [], []
for (seq, start, end, exp, good, health, util, umax, mem, energy, est, power, temp, unav) in windows:
    s = within(smi, start, end)
    n = within(pyn, start, end)
    util_smi = mean([x["util"] for x in s])
    util_nvml = mean([x["util"] for x in n])
    mem_smi = max([x["mem_mib"] for x in s if x["mem_mib"] is not None], default=None)
    if meta["have_smi_energy"]:
        e_smi = delta(smi, "energy_mj", start, end)
        e_smi = None if e_smi is None else e_smi / 1000
    else:
        pw = mean([x["power_w"] for x in s])
        e_smi = None if pw is None or len(s) < (end - start) / 1000 * 0.8 else pw * (end - start) / 1000
    e_nvml = delta(pyn, "energy_mj", start, end)
    e_nvml = None if e_nvml is None else e_nvml / 1000
    power_smi = mean([x["power_w"] for x in s])
    if load.get("ok"):
        busy = min(end, load["end_ms"]) - max(start, load["start_ms"])
        phase = "full" if end <= load["half_ms"] else ("half" if start >= load["half_ms"] else "both")
        load_col = f"{phase} {max(0, busy) * 100 // (end - start)} %" if busy > 0 else "idle"
    else:
        load_col = "none"
    e_agent = None if energy is None else energy / 1000
    whole = good == exp == W // meta["interval_ms"]
    if whole and util is not None and util_smi is not None and len(s) >= 8:
        diffs_util.append(abs(util - util_smi))
    ref = e_nvml if e_nvml is not None else e_smi
    if whole and e_agent is not None and ref:
        diffs_energy.append(abs(e_agent - ref) / ref * 100)
    p(f"| {hms(start)}–{hms(end)} | {good}/{exp} | {health} | {fmt(util)} | {fmt(util_smi)} | "
      f"{fmt(util_nvml)} | {fmt(None if mem is None else mem / 2**20, 0)} | {fmt(mem_smi, 0)} | "
      f"{fmt(e_agent)}{' (est.)' if est else ''} | "
      f"{'' if meta['have_smi_energy'] or e_smi is None else '≈'}{fmt(e_smi)} | {fmt(e_nvml)} | "
      f"{fmt(power)} | {fmt(power_smi)} | {load_col} |")
if not windows:
    p("| (no windows from the agent for this card) |||||||||||||| ")
p("")
p("Summary over whole windows (every sample good and at least 8 nvidia-smi samples):")
p("")
if diffs_util:
    p(f"- utilization, agent vs nvidia-smi: mean |Δ| {sum(diffs_util) / len(diffs_util):.1f} points, "
      f"max {max(diffs_util):.1f} points over {len(diffs_util)} windows")
else:
    p("- utilization: no window to compare")
if diffs_energy:
    p(f"- energy, agent vs {'pynvml' if pyn else 'nvidia-smi'}: mean |Δ| "
      f"{sum(diffs_energy) / len(diffs_energy):.1f} %, max {max(diffs_energy):.1f} % over "
      f"{len(diffs_energy)} windows")
else:
    p("- energy: no window to compare")
p("")
p("Agent events: " + (", ".join(f"{k} × {n}" for k, n in events) or "none")
  + " (enforcement events are observe-mode records: this run imports no grants, so every GPU "
  "process is on an unassigned card)")
p("")
p("## Processes")
p("")
p("Per window: the principals the agent attributed on this card (from /proc of each pid NVML "
  "listed) beside the compute apps nvidia-smi and pynvml listed in the same span.")
p("")
p("| window (UTC) | agent principals (uid, max MiB, processes, occupied s) | nvidia-smi compute apps "
  "(pid user, MiB) | pynvml processes (pid, MiB) |")
p("|---|---|---|---|")
load_pid = load.get("pid")
seen_smi, seen_agent = 0, 0
for (seq, start, end, *_rest) in windows:
    ag = principals.get(seq, [])
    ag_txt = "; ".join(f"{l} ({u}, {m // 2**20}, {n}, {o / 1000:.0f})" for l, u, o, m, n in ag) or "–"
    ap = {}
    for rec in within(apps, start, end):
        for a in rec["apps"]:
            if a["uuid"] == uuid:
                ap[a["pid"]] = a
    ap_txt = "; ".join(f"{a['pid']} {a['user'] or '?'} ({a['used_mib']})" for a in ap.values()) or "–"
    pp = {}
    for rec in within(pyn, start, end):
        for q in rec["procs"]:
            pp[q["pid"]] = q
    pp_txt = "; ".join(
        f"{q['pid']} ({'–' if q['used'] is None else q['used'] // 2**20})" for q in pp.values()) or "–"
    if load_pid in ap:
        seen_smi += 1
        if any(l == f"user:{meta['load_user']}" or u == load.get("uid") for l, u, *_ in ag):
            seen_agent += 1
    p(f"| {hms(start)}–{hms(end)} | {ag_txt} | {ap_txt} | {pp_txt} |")
p("")
if load.get("ok") and meta["have_smi"]:
    pids = {a["pid"] for rec in apps for a in rec["apps"] if a["uuid"] == uuid}
    if seen_smi:
        p(f"- The load's pid {load_pid} was in nvidia-smi's list in {seen_smi} windows; the agent "
          f"named its owner (`user:{meta['load_user']}` / uid {load['uid']}) in {seen_agent} of them.")
    elif pids:
        p(f"- nvidia-smi listed pids {sorted(pids)} but not the load's pid {load_pid}: this script "
          "probably runs in a different PID namespace than the driver reports (a container "
          "without the host's PID namespace), where /proc cannot attribute GPU processes.")
    else:
        p(f"- nvidia-smi never listed a compute app on this card (the load's pid was {load_pid}).")
elif not load.get("ok"):
    p("- No load ran, so there is no process to match.")
p("")
log_path = os.path.join(work, "agent.log")
ansi = re.compile(r"\x1b\[[0-9;]*m")
bad = [ansi.sub("", l.rstrip()) for l in open(log_path, errors="replace")
       if re.search(r"\b(WARN|ERROR)\b", ansi.sub("", l))]
p("## Agent warnings and errors")
p("")
if bad:
    p("```text")
    for l in bad[-30:]:
        p(l)
    p("```")
else:
    p("None.")
print("\n".join(out))
sys.exit(0 if windows else 1)
PY

set +e
SMOKE_WINDOW_MS=$WINDOW_MS SMOKE_INTERVAL_MS=$INTERVAL_MS SMOKE_GPU=$GPU SMOKE_NVML_LIB=$NVML_LIB \
  SMOKE_HAVE_SMI=$HAVE_SMI SMOKE_HAVE_SMI_ENERGY=$HAVE_SMI_ENERGY SMOKE_AGENT_RC=$AGENT_RC \
  SMOKE_USER=$(id -un) SMOKE_AGENT_VERSION=$("$AGENT" --version 2>/dev/null || echo unknown) \
  python3 "$WORK/report.py" "$WORK" "$UUID" >"$WORK/gpu-validation.md" 2>"$WORK/report.err"
REPORT_RC=$?
set -e
stop_pid "$COLLECTOR_PID" 5
if [ -s "$WORK/report.err" ]; then cat "$WORK/report.err" >&2; fi
cat "$WORK/gpu-validation.md"
if [ -n "${OUT_DIR:-}" ]; then
  mkdir -p "$OUT_DIR/gpu-smoke"
  cp "$WORK/gpu-validation.md" "$OUT_DIR/gpu-validation.md"
  for f in probe.txt probe.json probe.err smi-gpu.csv smi-gpu.err smi-inventory.csv samples.jsonl \
           load.json load.err agent.log collector.log agent.toml ledger.db; do
    if [ -e "$WORK/$f" ]; then cp "$WORK/$f" "$OUT_DIR/gpu-smoke/"; fi
  done
  log "report written to $OUT_DIR/gpu-validation.md"
fi
if [ "$REPORT_RC" != 0 ]; then
  log "the agent delivered no window for $UUID"
  exit 1
fi
exit 0
