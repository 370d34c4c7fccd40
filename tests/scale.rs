//! Reports at fleet scale over the real collector (TLS gRPC, a real SQLite file): replies that
//! would outgrow a client's message limit stream in parts, and reports read through the
//! rollups give exactly what they give over the windows.

use gpumeter_e2e::{TestCollector, admin_at, query_at};
use gpumeter_proto::v1;
use prost::Message;

/// 2,000 cards on 250 hosts in 400 grants, for November 2026: the month's per-card-day list
/// alone is 60,000 rows, well over 4 MiB.
fn fleet_csv(cards: usize) -> String {
    let mut csv = String::from(
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n",
    );
    for i in 0..cards {
        csv.push_str(&format!(
            "G-{:04},research,Lab {},user:u{},kt,host-{:03},GPU-{:08x}-0000-4000-8000-000000000000,2026-11-01,2026-11-30\n",
            i / 5,
            i / 5,
            i / 5,
            i / 8,
            i
        ));
    }
    csv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_report_for_two_thousand_cards_streams_where_one_reply_would_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let collector = TestCollector::start(&dir.path().join("ledger.db"))
        .await
        .unwrap();
    let mut admin = admin_at(&collector.url).await;
    let r = admin
        .import_grants(v1::ImportGrantsRequest {
            csv: fleet_csv(2_000),
            actor: "test".into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors.is_empty(), "{:?}", r.errors);

    let q = v1::ReconcileRequest {
        period: "2026-11".into(),
        ..Default::default()
    };
    let mut query = query_at(&collector.url).await;
    // The unary form refuses, naming the streamed one, rather than send what no default client
    // can take.
    let refused = query.reconcile(q.clone()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("StreamReconcile"), "{refused:?}");

    // Streamed, no part is near the limit, and the parts make the whole month.
    let mut parts = query
        .stream_reconcile(q.clone())
        .await
        .unwrap()
        .into_inner();
    let mut sizes = Vec::new();
    let mut whole: Option<v1::ReconcileReply> = None;
    while let Some(p) = parts.message().await.unwrap() {
        sizes.push(p.encoded_len());
        match whole.as_mut() {
            None => whole = Some(p),
            Some(w) => gpumeter_collector::parts::append_reconcile(w, p),
        }
    }
    let whole = whole.unwrap();
    assert!(sizes.len() > 4, "{sizes:?}");
    assert!(
        sizes
            .iter()
            .all(|&s| s <= gpumeter_collector::parts::PART_BYTES + 1024),
        "{sizes:?}"
    );
    assert!(whole.encoded_len() > 4 << 20, "{}", whole.encoded_len());
    assert_eq!(whole.grants.len(), 400);
    assert_eq!(whole.days.len(), 2_000 * 30);
    // Without the per-day figures (what every format but the HTML page asks for), the reply
    // grows with cards, not cards × days, and holds the same figures.
    let mut lean: Option<v1::ReconcileReply> = None;
    let mut parts = query
        .stream_reconcile(v1::ReconcileRequest {
            without_days: true,
            ..q.clone()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(p) = parts.message().await.unwrap() {
        match lean.as_mut() {
            None => lean = Some(p),
            Some(w) => gpumeter_collector::parts::append_reconcile(w, p),
        }
    }
    let lean = lean.unwrap();
    assert!(lean.days.is_empty());
    assert_eq!((&lean.grants, &lean.total), (&whole.grants, &whole.total));
    assert!(
        lean.encoded_len() * 4 < whole.encoded_len(),
        "{} of {}",
        lean.encoded_len(),
        whole.encoded_len()
    );
    let total = whole.total.unwrap();
    assert_eq!(total.allocated_ms, 2_000 * 30 * 86_400_000);
    assert_eq!(total.unmetered_ms, total.allocated_ms, "nothing metered");

    // The command line reads the streamed form: the report is written whole.
    let out = collector
        .cli()
        .args([
            "report",
            "--server",
            &collector.url,
            "--period",
            "2026-11",
            "--format",
            "csv",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    let grant_rows: Vec<&str> = csv.lines().filter(|l| l.starts_with("grant,")).collect();
    assert_eq!(grant_rows.len(), 400, "one row per grant");
    assert!(
        grant_rows
            .iter()
            .all(|l| l.contains(",5,2026-11-01,2026-11-30,3600.000000,")),
        "each grant's five cards, allocated the whole month"
    );
    assert!(
        grant_rows[399].contains("G-0399"),
        "the last grant is there"
    );
    collector.stop().await.unwrap();
}
