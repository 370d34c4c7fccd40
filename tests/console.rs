//! The web console in a real browser: a real collector with real TLS on loopback and a
//! simulated agent at real time (2 s windows), the console served on its own port, and
//! Debian's headless `chromium` driven over the DevTools protocol (crate `headless_chrome`).
//! The browser logs in with an auditor token, follows every page, and the figures it shows
//! are checked against the Reconcile RPC as of the same signed head, a grant's jobs against
//! the StreamJobs RPC; a card's state is
//! watched changing live; an auditor is refused every admin view; a request without a
//! session goes to the login page; the cookie's flags and the security headers are read off
//! the wire. Screenshots go to docs/console/.
//!
//! Without chromium the browser test says `skipping: chromium not installed` and passes,
//! unless GPUMETER_REQUIRE_ALL is set (as .ci/run does), where it fails. The header and
//! status tests need no browser.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpumeter_agent::config::SamplingConfig;
use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_collector::server::ConsoleListen;
use gpumeter_e2e::https::{self, request};
use gpumeter_e2e::{TestCollector, agent_config, now_ms, replay_options, spawn_sim_agent};
use gpumeter_proto::v1;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

const WINDOW_MS: i64 = 2_000;
const DAY_MS: i64 = 86_400_000;

fn kst_day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap())
        .format("%Y-%m-%d")
        .to_string()
}

fn card(n: u32) -> String {
    format!("GPU-0000007{n}-0000-4000-8000-000000000000")
}

/// Says a component is missing: a failure under GPUMETER_REQUIRE_ALL, else a skip.
fn missing(what: &str) {
    if std::env::var_os("GPUMETER_REQUIRE_ALL").is_some() {
        panic!("{what} not installed, and GPUMETER_REQUIRE_ALL is set");
    }
    let _ = writeln!(std::io::stderr(), "skipping: {what} not installed");
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUMETER_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A collector with the console on a port of its own, and the console's address.
async fn start() -> (TestCollector, SocketAddr) {
    let mut opts = replay_options();
    let (console, addr) = ConsoleListen::bind("127.0.0.1:0").unwrap();
    opts.console = Some(console);
    // Recompute a period's figures at every second's page, so pages follow the ledger.
    opts.console_options.report_ttl = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap().keep();
    let collector = TestCollector::start_with(&dir.join("ledger.db"), "127.0.0.1:0", opts)
        .await
        .unwrap();
    (collector, addr)
}

async fn import(collector: &TestCollector, rows: &[(&str, &str, &str, String)]) {
    let now = now_ms();
    let (from, until) = (kst_day(now - DAY_MS), kst_day(now + DAY_MS));
    let mut csv =
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n"
            .to_string();
    for (g, program, host, gpu) in rows {
        csv.push_str(&format!(
            "{g},{program},Lab-{g},user:alice,kt,{host},{gpu},{from},{until}\n"
        ));
    }
    let r = collector
        .admin()
        .await
        .import_grants(v1::ImportGrantsRequest {
            csv,
            actor: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_refuses_without_a_session_and_sets_its_headers() {
    let (collector, addr) = start().await;
    let auditor = collector.token("auditor", "aud-headers");
    let admin = collector.token("admin", "adm-headers");

    // No session: every page goes to the login page, the live stream is 401.
    for path in ["/", "/grants", "/cards/GPU-x", "/admin/tokens", "/ledger"] {
        let a = request(addr, "GET", path, &[], None).await.unwrap();
        assert_eq!(a.status, 303, "{path}: {a:?}");
        assert!(
            a.header("location").unwrap().starts_with("/login?next="),
            "{path}"
        );
    }
    assert_eq!(
        request(addr, "GET", "/live", &[], None)
            .await
            .unwrap()
            .status,
        401
    );

    // The login page and every answer carry the policy and headers.
    let a = request(addr, "GET", "/login", &[], None).await.unwrap();
    assert_eq!(a.status, 200);
    let csp = a.header("content-security-policy").unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    for d in [
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(d), "{d} in {csp}");
    }
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(a.header("referrer-policy"), Some("same-origin"));
    assert_eq!(a.header("cache-control"), Some("no-store"));
    assert!(!a.body.contains("<style") && !a.body.contains(" style="));
    assert_eq!(
        a.body.matches("<script").count(),
        1,
        "only the served script"
    );

    // A wrong token, a cross-origin login: no session.
    let origin = format!("https://{addr}");
    let bad = https::post_login(addr, "gpm_00", "%2F").await.unwrap();
    assert_eq!(bad.status, 303);
    assert!(bad.header("set-cookie").is_none());
    let cross = request(
        addr,
        "POST",
        "/login",
        &[("Origin", "https://evil.example")],
        Some(&format!("token={auditor}&next=%2F")),
    )
    .await
    .unwrap();
    assert_eq!(cross.status, 403);
    assert!(cross.header("set-cookie").is_none());

    // The session cookie's flags, as sent.
    let a = https::post_login(addr, &auditor, "%2Fgrants")
        .await
        .unwrap();
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/grants"));
    let set = a.header("set-cookie").unwrap();
    for attr in [
        "gpm_session=",
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();

    // An auditor reaches the pages, never an admin view.
    for path in [
        "/",
        "/grants",
        "/violations",
        "/alarms",
        "/idle",
        "/downloads",
        "/ledger",
    ] {
        let a = request(addr, "GET", path, &[("Cookie", &cookie)], None)
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        assert!(a.header("content-security-policy").is_some());
        assert!(
            !a.body.contains("/admin/tokens\""),
            "{path} links no admin view"
        );
    }
    // The fleet page streams hosts and the grants page grants, not every card; a stream
    // asked for anything else is refused.
    let fleet = request(addr, "GET", "/", &[("Cookie", &cookie)], None)
        .await
        .unwrap();
    assert!(
        fleet.body.contains("data-live-view=\"hosts\""),
        "{}",
        fleet.body
    );
    let bogus = request(addr, "GET", "/live?view=all", &[("Cookie", &cookie)], None)
        .await
        .unwrap();
    assert_eq!(bogus.status, 400, "{}", bogus.body);
    for path in ["/admin/tokens", "/admin/agents"] {
        let a = request(addr, "GET", path, &[("Cookie", &cookie)], None)
            .await
            .unwrap();
        assert_eq!(a.status, 403, "{path}");
        assert!(
            !a.body.contains("id=\"tokens\"") && !a.body.contains("adm-headers"),
            "{path} shows no token"
        );
    }
    // A POST without the session's CSRF token, or from elsewhere, is refused.
    let v = request(
        addr,
        "POST",
        "/ledger/verify",
        &[("Cookie", &cookie), ("Origin", &origin)],
        Some("csrf=nope"),
    )
    .await
    .unwrap();
    assert_eq!(v.status, 403);
    let v = request(
        addr,
        "POST",
        "/logout",
        &[("Cookie", &cookie), ("Origin", "https://evil.example")],
        Some("csrf=nope"),
    )
    .await
    .unwrap();
    assert_eq!(v.status, 403);

    // An admin sees the tokens (names and roles, never hashes).
    let admin_cookie = https::login(addr, &admin).await.unwrap();
    let a = request(
        addr,
        "GET",
        "/admin/tokens",
        &[("Cookie", &admin_cookie)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    assert!(a.body.contains("aud-headers") && a.body.contains("adm-headers"));
    let hash = gpumeter_collector::auth::tokens::token_hash(&auditor);
    assert!(!a.body.contains(&hash));

    // Revoking the token ends its session at the next request.
    let store = collector.backend.open().unwrap();
    assert!(store.revoke_token("aud-headers", now_ms()).unwrap());
    let a = request(addr, "GET", "/grants", &[("Cookie", &cookie)], None)
        .await
        .unwrap();
    assert_eq!(a.status, 303, "a revoked token's session is over");

    // Login attempts from one address are limited: wrong tokens until the limit, then 429
    // with Retry-After, and then even a good token waits.
    let mut answers = Vec::new();
    for _ in 0..=gpumeter_collector::console::session::LOGIN_BURST {
        let a = https::post_login(addr, "gpm_00", "%2F").await.unwrap();
        answers.push(a.status);
        if a.status == 429 {
            let wait: u64 = a.header("retry-after").unwrap().parse().unwrap();
            assert!(wait >= 1, "Retry-After {wait}");
            assert!(a.body.contains("too many login attempts"), "{}", a.body);
            break;
        }
    }
    assert_eq!(answers.last(), Some(&429), "never limited: {answers:?}");
    assert!(
        answers[..answers.len() - 1].iter().all(|s| *s == 303),
        "{answers:?}"
    );
    let a = https::post_login(addr, &admin, "%2F").await.unwrap();
    assert_eq!(a.status, 429, "a good token waits like any other attempt");
    assert!(a.header("set-cookie").is_none());
    collector.stop().await.unwrap();
}

/// Runs `js` in the page and returns its value as text ("" for null).
fn js(tab: &Tab, js: &str) -> String {
    let v = tab.evaluate(js, false).unwrap().value;
    match v {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

fn goto(tab: &Tab, base: &str, path: &str) {
    tab.navigate_to(&format!("{base}{path}")).unwrap();
    tab.wait_until_navigated().unwrap();
}

fn shot(tab: &Tab, name: &str) {
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Waits until the tab's URL contains `part` (a form's answer is a redirect: the click
/// returns before the browser has followed it).
fn wait_url(tab: &Tab, part: &str) {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if tab.get_url().contains(part) {
            let _ = tab.wait_until_navigated();
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the browser did not reach {part}: {}", tab.get_url());
}

/// Waits until `js` gives `want`, up to `limit`; returns when it did.
fn wait_js(tab: &Tab, expr: &str, want: &str, limit: Duration) -> Option<Instant> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if js(tab, expr) == want {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_in_a_real_browser() {
    let Some(bin) = chromium() else {
        missing("chromium");
        return;
    };
    let (collector, addr) = start().await;
    let (c0, c1) = (card(0), card(1));
    import(&collector, &[("G-C", "research", "host-c", c0.clone())]).await;
    let auditor = collector.token("auditor", "browser-auditor");
    let admin = collector.token("admin", "browser-admin");

    // C0: alice (the grantee) at 70 % until `switch`, then nobody: idle.
    // C1 (no grant): bob at 30 % from `switch` on: use of an unassigned card.
    let dir = tempfile::tempdir().unwrap();
    let start = now_ms();
    let switch_s = 30;
    let stop_at = start + 42_000;
    let mut cfg = agent_config(
        "host-c",
        "kt",
        &collector.url,
        &dir.path().join("host-c"),
        64,
    );
    cfg.sampling = SamplingConfig {
        interval_ms: 500,
        window_ms: WINDOW_MS as u64,
    };
    let scenario: Scenario = toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{c0}"
[[cards.phases]]
from_s = 0
until_s = {switch_s}
util_pct = 70
memory_used_bytes = 8589934592
processes = [{{ pid = 501, uid = 1001, user = "alice", memory_bytes = 8589934592 }}]
[[cards.phases]]
from_s = {switch_s}
util_pct = 0

[[cards]]
uuid = "{c1}"
[[cards.phases]]
from_s = 0
until_s = {switch_s}
util_pct = 0
[[cards.phases]]
from_s = {switch_s}
util_pct = 30
processes = [{{ pid = 502, uid = 1002, user = "bob" }}]
"#
    ))
    .unwrap();
    let agent = spawn_sim_agent(cfg, scenario, start, stop_at, 1.0).unwrap();

    let base = format!("https://{addr}");
    let day = kst_day(start);
    let profile = tempfile::tempdir().unwrap();
    let browse = {
        let (base, day, c0, c1) = (base.clone(), day.clone(), c0.clone(), c1.clone());
        let (auditor, admin) = (auditor.clone(), admin.clone());
        let profile = profile.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            // Real TLS with the test CA's certificate, which this throwaway profile does not
            // trust: certificate errors are ignored for it (the connection is still TLS).
            let browser = Browser::new(LaunchOptions {
                path: Some(bin),
                headless: true,
                sandbox: false,
                window_size: Some((1200, 800)),
                ignore_certificate_errors: true,
                user_data_dir: Some(profile),
                idle_browser_timeout: Duration::from_secs(120),
                ..LaunchOptions::default()
            })
            .expect("chromium starts");
            let tab = browser.new_tab().unwrap();
            tab.set_default_timeout(Duration::from_secs(20));

            // No session: the login page, which comes back to the page asked for.
            goto(&tab, &base, &format!("/grants?period={day}"));
            assert!(tab.get_url().contains("/login?next="), "{}", tab.get_url());
            shot(&tab, "login");
            tab.wait_for_element("#token")
                .unwrap()
                .type_into(&auditor)
                .unwrap();
            tab.wait_for_element("#login").unwrap().click().unwrap();
            wait_url(&tab, "/grants");

            // The cookie as the browser keeps it.
            let cookies = tab.get_cookies().unwrap();
            let session = cookies
                .iter()
                .find(|c| c.name == "gpm_session")
                .expect("session cookie");
            assert!(session.http_only && session.secure, "{session:?}");
            assert_eq!(format!("{:?}", session.same_site), "Some(Strict)");
            assert_eq!(session.path, "/");

            // The card page, live: busy under its grant, then idle, without a reload.
            goto(&tab, &base, &format!("/cards/{c0}?period={day}"));
            let state =
                format!("document.querySelector('[data-card=\"{c0}\"] .state').dataset.state");
            assert!(
                wait_js(&tab, &state, "ok", Duration::from_secs(15)).is_some(),
                "C0 busy: {}",
                js(&tab, &state)
            );
            let util = js(
                &tab,
                &format!("document.querySelector('[data-card=\"{c0}\"] .live-util').textContent"),
            );
            assert_eq!(util, "70.0%");
            shot(&tab, "card");
            let idle_seen = wait_js(&tab, &state, "idle", Duration::from_secs(30));
            assert!(idle_seen.is_some(), "C0 turned idle on the open page");
            let end: i64 = js(
                &tab,
                &format!("document.querySelector('[data-card=\"{c0}\"]').dataset.windowEnd"),
            )
            .parse()
            .unwrap();
            // Shown within one window of its window's end (the agent sends at the window end).
            let lag = now_ms() - end;
            assert!(
                lag < 2 * WINDOW_MS + 1_000,
                "idle shown {lag} ms after its window ended"
            );
            // The fleet page: the host and its live connection.
            goto(&tab, &base, &format!("/?period={day}"));
            assert!(js(&tab, "document.querySelector('#hosts').innerText").contains("host-c"));
            assert!(
                wait_js(
                    &tab,
                    "document.querySelector('[data-host=\"host-c\"] .conn').dataset.state",
                    "connected",
                    Duration::from_secs(15)
                )
                .is_some(),
                "the host shows connected"
            );
            shot(&tab, "fleet");

            // The unassigned card is violating on its own page.
            goto(&tab, &base, &format!("/cards/{c1}?period={day}"));
            let state1 =
                format!("document.querySelector('[data-card=\"{c1}\"] .state').dataset.state");
            assert!(
                wait_js(&tab, &state1, "violating", Duration::from_secs(20)).is_some(),
                "C1 violating"
            );

            // Every page answers for an auditor; admin views do not.
            for (path, id, name) in [
                (format!("/grants?period={day}"), "#grants", "grants"),
                (format!("/grants/G-C?period={day}"), "#grant-cards", "grant"),
                (
                    format!("/violations?period={day}"),
                    "#violations",
                    "violations",
                ),
                ("/alarms".to_string(), "#alarms", "alarms"),
                (format!("/idle?period={day}"), "#idle-rule", "idle"),
                (format!("/downloads?period={day}"), "#formats", "downloads"),
                ("/ledger".to_string(), "#verify-now", "ledger"),
            ] {
                goto(&tab, &base, &path);
                tab.wait_for_element(id)
                    .unwrap_or_else(|e| panic!("{path}: {e}"));
                shot(&tab, name);
            }
            assert!(
                js(
                    &tab,
                    "String(!!document.querySelector('a[href=\"/admin/tokens\"]'))"
                ) == "false"
            );
            for path in ["/admin/tokens", "/admin/agents"] {
                goto(&tab, &base, path);
                let body = js(&tab, "document.body.innerText");
                assert!(body.contains("403"), "{path}: {body}");
                assert!(!body.contains("browser-admin"), "{path} shows no token");
            }
            // Verification from the ledger page (a CSRF-guarded form).
            goto(&tab, &base, "/ledger");
            tab.wait_for_element("#verify-now")
                .unwrap()
                .click()
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let ok = (0..100).any(|_| {
                goto(&tab, &base, "/ledger");
                let s = js(&tab, "document.querySelector('#verify-state').className");
                if s == "ok-text" {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
                false
            });
            assert!(
                ok,
                "the ledger verifies: {}",
                js(&tab, "document.body.innerText")
            );
            shot(&tab, "ledger");

            // The language switch.
            goto(&tab, &base, "/alarms");
            tab.wait_for_element("#lang-switch")
                .unwrap()
                .click()
                .unwrap();
            assert!(
                wait_js(
                    &tab,
                    "document.documentElement.lang",
                    "ko",
                    Duration::from_secs(10)
                )
                .is_some()
            );
            assert!(js(&tab, "document.body.innerText").contains("경보"));

            // Logout ends the session; an admin's session reaches the admin views.
            tab.wait_for_element("#logout").unwrap().click().unwrap();
            wait_url(&tab, "/login");
            goto(&tab, &base, "/grants");
            assert!(tab.get_url().contains("/login"), "{}", tab.get_url());
            tab.wait_for_element("#token")
                .unwrap()
                .type_into(&admin)
                .unwrap();
            tab.wait_for_element("#login").unwrap().click().unwrap();
            wait_url(&tab, "/grants");
            goto(&tab, &base, "/admin/tokens");
            let body = js(&tab, "document.querySelector('#tokens').innerText");
            assert!(
                body.contains("browser-auditor") && body.contains("browser-admin"),
                "{body}"
            );
            shot(&tab, "admin");
            goto(&tab, &base, "/lang/en?back=/");
            (browser, tab)
        })
    };
    let (browser, tab) = browse.await.unwrap();
    agent.await.unwrap().unwrap();

    // The figures shown, against the Reconcile RPC as of the head the page names.
    let (shown, head) = tokio::task::spawn_blocking({
        let (base, day) = (base.clone(), day.clone());
        let tab = tab.clone();
        move || {
            std::thread::sleep(Duration::from_millis(800));
            goto(&tab, &base, &format!("/grants?period={day}"));
            tab.wait_for_element("#grants").unwrap();
            let head: u64 = js(&tab, "document.querySelector('#report-head').dataset.head")
                .parse()
                .unwrap();
            let row = |k: &str| -> u64 {
                js(
                    &tab,
                    &format!("document.querySelector('[data-grant=\"G-C\"] .fig-{k}').dataset.ms"),
                )
                .parse()
                .unwrap()
            };
            shot(&tab, "grants");
            ((row("allocated"), row("delivered"), row("active")), head)
        }
    })
    .await
    .unwrap();
    let reply = collector
        .query()
        .await
        .reconcile(v1::ReconcileRequest {
            period: day.clone(),
            as_of_head: head,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let g = reply.grants.iter().find(|g| g.grant_id == "G-C").unwrap();
    let f = g.figures.as_ref().unwrap();
    assert_eq!(shown, (f.allocated_ms, f.delivered_ms, f.active_ms));
    assert!(f.delivered_ms > 0 && f.active_ms > 0, "{f:?}");

    // The grant's jobs that day, reached by the grant page's link: each row against the
    // StreamJobs RPC over the same ledger (the agent has stopped, so it no longer changes).
    let shown_jobs = tokio::task::spawn_blocking({
        let (base, day) = (base.clone(), day.clone());
        let tab = tab.clone();
        move || {
            goto(&tab, &base, &format!("/grants/G-C?period={day}"));
            tab.wait_for_element("#jobs-link").unwrap().click().unwrap();
            tab.wait_for_element("#jobs").unwrap();
            let url = tab.get_url();
            assert!(url.contains("/grants/G-C/jobs?day="), "{url}");
            js(
                &tab,
                "Array.from(document.querySelectorAll('#jobs tbody tr')).map(r => \
                 Array.from(r.cells).map(c => c.textContent).join('|')).join('\\n')",
            )
        }
    })
    .await
    .unwrap();
    let mut jobs = collector
        .query()
        .await
        .stream_jobs(v1::JobsRequest {
            period: day.clone(),
            grant_id: "G-C".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (mut expected, mut card_time) = (Vec::new(), 0);
    let h = |ms: u64| format!("{:.1}", ms as f64 / 3_600_000.0);
    while let Some(j) = jobs.message().await.unwrap() {
        card_time += j.occupied_ms;
        expected.push((
            j.kind.clone(),
            j.job_id.clone(),
            j.principal.clone(),
            j.gpu_uuids.len().to_string(),
            h(j.occupied_ms),
            h(j.active_ms),
        ));
    }
    // The run is short: its GPU-hours show as 0.0, so the card time is checked here.
    assert!(card_time > 0, "G-C ran no job with card time: {expected:?}");
    let shown_jobs: Vec<_> = shown_jobs
        .lines()
        .map(|r| {
            let c: Vec<&str> = r.split('|').collect();
            assert_eq!(c.len(), 8, "{r}");
            (
                c[0].to_string(),
                c[1].to_string(),
                c[2].to_string(),
                c[3].to_string(),
                c[6].to_string(),
                c[7].to_string(),
            )
        })
        .collect();
    assert_eq!(shown_jobs, expected);
    drop(tab);
    drop(browser);
    collector.stop().await.unwrap();
}
