//! Large replies in parts (`StreamReconcile`, `StreamUsage`): no message grows with the
//! fleet. The first part carries every field but the lists; each later part carries a slice of
//! one list, of at most [`PART_BYTES`] encoded (one item larger than that goes alone). A
//! reader appends each part's lists in order: the result is the whole reply, exactly as the
//! unary form would have sent it (protobuf's merge of the concatenated parts gives the same).

use futures::StreamExt;
use gpumeter_proto::v1;
use prost::Message;
use tonic::Status;

/// The most a part's list slice holds, encoded: well under tonic's default 4 MiB limit.
pub const PART_BYTES: usize = 1 << 20;

/// `items` in slices of at most [`PART_BYTES`] encoded each.
fn slices<T: Message>(items: Vec<T>) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for item in items {
        // The list's tag and length prefix, at most 6 bytes, count too.
        let len = item.encoded_len() + 6;
        if !cur.is_empty() && bytes + len > PART_BYTES {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += len;
        cur.push(item);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A reconciliation reply as its parts.
pub fn reconcile_parts(mut r: v1::ReconcileReply) -> Vec<v1::ReconcileReply> {
    let grants = std::mem::take(&mut r.grants);
    let programs = std::mem::take(&mut r.programs);
    let csps = std::mem::take(&mut r.csps);
    let unassigned = std::mem::take(&mut r.unassigned);
    let idle = r
        .idle
        .as_mut()
        .map(|i| std::mem::take(&mut i.grants))
        .unwrap_or_default();
    let invoices = std::mem::take(&mut r.invoices);
    let invoice_csps = std::mem::take(&mut r.invoice_csps);
    let days = std::mem::take(&mut r.days);
    let card_alarms = std::mem::take(&mut r.card_alarms);
    let mut parts = vec![r];
    let part = v1::ReconcileReply::default;
    parts.extend(
        slices(grants)
            .into_iter()
            .map(|grants| v1::ReconcileReply { grants, ..part() }),
    );
    parts.extend(
        slices(programs)
            .into_iter()
            .map(|programs| v1::ReconcileReply { programs, ..part() }),
    );
    parts.extend(
        slices(csps)
            .into_iter()
            .map(|csps| v1::ReconcileReply { csps, ..part() }),
    );
    parts.extend(
        slices(unassigned)
            .into_iter()
            .map(|unassigned| v1::ReconcileReply {
                unassigned,
                ..part()
            }),
    );
    parts.extend(slices(idle).into_iter().map(|grants| v1::ReconcileReply {
        idle: Some(v1::IdleGrantsReply {
            grants,
            ..Default::default()
        }),
        ..part()
    }));
    parts.extend(
        slices(invoices)
            .into_iter()
            .map(|invoices| v1::ReconcileReply { invoices, ..part() }),
    );
    parts.extend(
        slices(invoice_csps)
            .into_iter()
            .map(|invoice_csps| v1::ReconcileReply {
                invoice_csps,
                ..part()
            }),
    );
    parts.extend(
        slices(days)
            .into_iter()
            .map(|days| v1::ReconcileReply { days, ..part() }),
    );
    parts.extend(
        slices(card_alarms)
            .into_iter()
            .map(|card_alarms| v1::ReconcileReply {
                card_alarms,
                ..part()
            }),
    );
    parts
}

/// Appends a later part's lists to the reply so far.
pub fn append_reconcile(acc: &mut v1::ReconcileReply, p: v1::ReconcileReply) {
    acc.grants.extend(p.grants);
    acc.programs.extend(p.programs);
    acc.csps.extend(p.csps);
    acc.unassigned.extend(p.unassigned);
    if let Some(i) = p.idle {
        acc.idle
            .get_or_insert_with(Default::default)
            .grants
            .extend(i.grants);
    }
    acc.invoices.extend(p.invoices);
    acc.invoice_csps.extend(p.invoice_csps);
    acc.days.extend(p.days);
    acc.card_alarms.extend(p.card_alarms);
}

/// A usage report as its parts.
pub fn usage_parts(mut r: v1::UsageReport) -> Vec<v1::UsageReport> {
    let cards = std::mem::take(&mut r.cards);
    let tenants = std::mem::take(&mut r.tenants);
    let mut parts = vec![r];
    parts.extend(slices(cards).into_iter().map(|cards| v1::UsageReport {
        cards,
        ..Default::default()
    }));
    parts.extend(slices(tenants).into_iter().map(|tenants| v1::UsageReport {
        tenants,
        ..Default::default()
    }));
    parts
}

pub fn append_usage(acc: &mut v1::UsageReport, p: v1::UsageReport) {
    acc.cards.extend(p.cards);
    acc.tenants.extend(p.tenants);
}

/// Gathers a streamed reply: the first part, then every later part appended.
pub async fn gather<T: Default>(
    mut parts: tonic::Streaming<T>,
    append: fn(&mut T, T),
) -> Result<T, Status> {
    let mut acc: Option<T> = None;
    while let Some(p) = parts.next().await {
        let p = p?;
        match acc.as_mut() {
            None => acc = Some(p),
            Some(a) => append(a, p),
        }
    }
    acc.ok_or_else(|| Status::data_loss("the collector sent no part of the reply"))
}

/// A whole reconciliation, fetched in parts (`StreamReconcile`).
pub async fn reconcile<T>(
    c: &mut v1::query_client::QueryClient<T>,
    q: v1::ReconcileRequest,
) -> Result<v1::ReconcileReply, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let parts = c.stream_reconcile(q).await?.into_inner();
    gather(parts, append_reconcile).await
}

/// A whole usage report, fetched in parts (`StreamUsage`).
pub async fn usage<T>(
    c: &mut v1::query_client::QueryClient<T>,
    q: v1::UsageRequest,
) -> Result<v1::UsageReport, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let parts = c.stream_usage(q).await?.into_inner();
    gather(parts, append_usage).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(i: usize) -> v1::CardDay {
        v1::CardDay {
            grant_id: format!("G{}", i / 30),
            host_id: format!("host-{}", i / 240),
            gpu_uuid: format!("GPU-{i:08}-0000-4000-8000-000000000000"),
            day: "2026-11-01".into(),
            allocated_ms: 86_400_000,
            delivered_ms: i as u64,
            active_ms: 7,
        }
    }

    #[test]
    fn parts_stay_small_and_append_to_the_whole_reply() {
        let whole = v1::ReconcileReply {
            period: "2026-11".into(),
            from_unix_ms: 1,
            until_unix_ms: 2,
            days: (0..60_000).map(day).collect(),
            idle: Some(v1::IdleGrantsReply {
                threshold_pct: 10.0,
                days: 14,
                as_of_unix_ms: 5,
                grants: vec![v1::IdleGrant {
                    grant_id: "G1".into(),
                    ..Default::default()
                }],
            }),
            total: Some(v1::Figures {
                allocated_ms: 9,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(whole.encoded_len() > 4 << 20, "{}", whole.encoded_len());
        let parts = reconcile_parts(whole.clone());
        assert!(parts.len() > 4);
        for p in &parts {
            assert!(p.encoded_len() <= PART_BYTES + 64, "{}", p.encoded_len());
        }
        // Appending the parts gives the reply back, and so does protobuf's merge of the
        // concatenated encodings.
        let mut it = parts.clone().into_iter();
        let mut acc = it.next().unwrap();
        for p in it {
            append_reconcile(&mut acc, p);
        }
        assert_eq!(acc, whole);
        let bytes: Vec<u8> = parts.iter().flat_map(|p| p.encode_to_vec()).collect();
        assert_eq!(v1::ReconcileReply::decode(bytes.as_slice()).unwrap(), whole);
    }

    #[test]
    fn an_empty_reply_is_one_part() {
        let parts = usage_parts(v1::UsageReport {
            from_unix_ms: 3,
            ..Default::default()
        });
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].from_unix_ms, 3);
    }
}
