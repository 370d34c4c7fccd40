//! The FOCUS CSV: the reconciliation as a FinOps Open Cost and Usage Specification 1.0 dataset.
//!
//! Format: UTF-8 without a byte order mark (it is for tools, not spreadsheets), a header of
//! column ids, written by the shared CSV writer ([`super::csv_writer`]: RFC 4180 quoting, CRLF
//! line ends, and the same spreadsheet-formula guard as the report CSV, since grantee names and
//! CSP ids are user input). Columns: the 43 of FOCUS 1.0, then `CapacityReservationId` and
//! `CapacityReservationStatus` (defined by FOCUS 1.1; a 1.0 reader ignores them), then
//! gpumeter's own figures as `x_` columns, then five compatibility columns: `Provider`,
//! `Publisher`, `InvoiceIssuer`, `ResourceID` and `ChargeType`, the pre-1.0 ids that
//! focus-validator 1.0.0's FOCUS 1.0 rule set still requires (FOCUS 1.0 renamed the first four
//! to `…Name`/`ResourceId` and dropped `ChargeType`). They repeat `ProviderName`,
//! `PublisherName`, `InvoiceIssuerName`, `ResourceId` and `ChargeCategory`, so the export passes
//! every rule of that validator and a strict 1.0 reader loses nothing.
//!
//! Rows. A grant's card is capacity reserved for the grantee, so each grant card gives two
//! `Usage` rows over the card's time in the grant within the period (`ChargePeriodStart/End`):
//! - `CapacityReservationStatus = Used`: `ConsumedQuantity` is the card's *occupied* GPU-hours
//!   (delivered time with a process of the grantee on it);
//! - `CapacityReservationStatus = Unused`: `ConsumedQuantity` is its *idle* GPU-hours
//!   (delivered, nobody of the grantee on it).
//!
//! So `ConsumedQuantity` summed over a card is its *delivered* GPU-hours, the quantity the CSP
//! is paid for (DESIGN.md §1), and the Used/Unused split is the reserved-but-idle time FinOps
//! tools already know how to show. Allocated time that was not delivered (unmetered, or the
//! card failed) is no consumption and has no row; it is in the `x_` columns. Active
//! (utilization-weighted) time is not a quantity the provider sells, so it is an `x_` column.
//!
//! Identities: `ProviderName`, `PublisherName` and `InvoiceIssuerName` are the CSP;
//! `BillingAccountId` is the program (the ministry pays per program), `SubAccountId` the grant
//! and `SubAccountName` its grantee; `ResourceId` is the GPU UUID, `ResourceName` its host;
//! `SkuId` is the program's GPU-hour and `SkuPriceId` the CSP's price for it. gpumeter meters
//! quantities; prices are in the CSP's contract, which the collector does not hold, so every
//! cost and unit price is `0.0` KRW and `PricingCategory` is `Other`.
//!
//! Credits. Allocated time in which the CSP's card was lost or failed (`unavailable`) is the
//! CSP's side of the service level: each grant with any gets one `ChargeCategory = Credit` row
//! against its CSP, over the grant's time in the period, with the unavailable GPU-hours as its
//! `PricingQuantity` and in `x_CreditGpuHours` (no consumption: `ConsumedQuantity` is null, as
//! FOCUS wants for a row that is not usage; its costs are 0.0 like every cost here, the won
//! amount being the contract's).
//!
//! `x_` columns: `x_Program`, `x_HostId` and `x_Principal` on every usage row; the card's
//! figures over the period (`x_AllocatedGpuHours` … `x_Violations`) on its `Used` row only,
//! empty on the `Unused` row, so that a column summed over the file is the report's total;
//! `x_CreditGpuHours` on credit rows only. Only the elapsed part of a period in progress is
//! in the file (see `crate::reconcile`).

use serde_json::json;

use crate::reconcile::{CardRow, GrantRow, Reconciliation};

use super::csv_writer::CsvWriter;
use super::report_csv::hours;
use super::utc_iso;

/// The header: FOCUS 1.0's columns, the two 1.1 capacity reservation columns, ours, and the
/// validator's pre-1.0 ids.
pub const COLUMNS: [&str; 66] = [
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "CapacityReservationId",
    "CapacityReservationStatus",
    "x_Program",
    "x_HostId",
    "x_Principal",
    "x_AllocatedGpuHours",
    "x_UnmeteredGpuHours",
    "x_UnavailableGpuHours",
    "x_DeliveredGpuHours",
    "x_OccupiedGpuHours",
    "x_ActiveGpuHours",
    "x_IdleGpuHours",
    "x_ForeignGpuHours",
    "x_UtilizationPct",
    "x_EnergyKwh",
    "x_Violations",
    "x_Period",
    "x_CreditGpuHours",
    "Provider",
    "Publisher",
    "InvoiceIssuer",
    "ResourceID",
    "ChargeType",
];

/// The unit of every quantity here (FOCUS UnitFormat: a plural unit joined to the time unit).
pub const GPU_HOURS: &str = "GPU-Hours";
/// The currency of the (zero) costs: the ministry pays in won.
const CURRENCY: &str = "KRW";
const ZERO: &str = "0.0";

/// The ministry's budget line a program is paid from, by its official (Korean) name.
fn program_name(id: &str) -> &str {
    super::Lang::Ko.labels().program_name(id)
}

/// The span from the card's first allocation to its last, within the period.
fn charge_period(r: &Reconciliation, c: &CardRow) -> (i64, i64) {
    let from = c.intervals.iter().map(|i| i.from_ms).min();
    let until = c.intervals.iter().map(|i| i.until_ms).max();
    (from.unwrap_or(r.from_ms), until.unwrap_or(r.until_ms))
}

/// The five compatibility columns' values, after `x_CreditGpuHours`: provider, publisher,
/// invoice issuer, resource id, charge type.
fn compat(csp: &str, resource: &str, category: &str) -> [String; 5] {
    [
        csp.to_owned(),
        csp.to_owned(),
        csp.to_owned(),
        resource.to_owned(),
        category.to_owned(),
    ]
}

fn card_rows(r: &Reconciliation, g: &GrantRow, c: &CardRow, out: &mut CsvWriter) {
    let (start, end) = charge_period(r, c);
    let f = &c.figures;
    let tags = json!({ "program": g.program, "host_id": c.host_id }).to_string();
    for used in [true, false] {
        let (quantity, status, description) = if used {
            (
                f.occupied_ms,
                "Used",
                "GPU card-time granted and delivered, with the grantee's processes on the card",
            )
        } else {
            (
                f.idle_ms,
                "Unused",
                "GPU card-time granted and delivered, with no process of the grantee on the card",
            )
        };
        let quantity = hours(quantity);
        let card_figure = |s: String| if used { s } else { String::new() };
        let row: [String; 60] = [
            String::new(),
            ZERO.into(),
            g.program.clone(),
            program_name(&g.program).to_owned(),
            CURRENCY.into(),
            utc_iso(r.until_ms),
            utc_iso(r.from_ms),
            "Usage".into(),
            String::new(),
            description.into(),
            "Usage-Based".into(),
            utc_iso(end),
            utc_iso(start),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            quantity.clone(),
            GPU_HOURS.into(),
            ZERO.into(),
            ZERO.into(),
            ZERO.into(),
            g.csp.clone(),
            ZERO.into(),
            ZERO.into(),
            "Other".into(),
            quantity,
            GPU_HOURS.into(),
            g.csp.clone(),
            g.csp.clone(),
            String::new(),
            String::new(),
            c.gpu_uuid.clone(),
            c.host_id.clone(),
            "GPU".into(),
            "Compute".into(),
            "GPU lease".into(),
            format!("{}-gpu-hour", g.program),
            format!("{}/{}-gpu-hour", g.csp, g.program),
            g.grant_id.clone(),
            g.grantee.clone(),
            tags.clone(),
            g.grant_id.clone(),
            status.into(),
            g.program.clone(),
            c.host_id.clone(),
            g.principal.clone(),
            card_figure(hours(f.allocated_ms)),
            card_figure(hours(f.unmetered_ms)),
            card_figure(hours(f.unavailable_ms)),
            card_figure(hours(f.delivered_ms)),
            card_figure(hours(f.occupied_ms)),
            card_figure(hours(f.active_ms)),
            card_figure(hours(f.idle_ms)),
            card_figure(hours(f.foreign_ms)),
            card_figure(
                f.utilization_pct()
                    .map_or(String::new(), |u| format!("{u:.2}")),
            ),
            card_figure(format!("{:.3}", f.energy_kwh())),
            card_figure(f.violations.to_string()),
            r.period.clone(),
        ];
        let mut cells: Vec<String> = row.into();
        cells.push(String::new());
        cells.extend(compat(&g.csp, &c.gpu_uuid, "Usage"));
        out.record(&cells);
    }
}

/// The grant's SLA credit row: its cards' unavailable time, against its CSP.
fn credit_row(r: &Reconciliation, g: &GrantRow, out: &mut CsvWriter) {
    let unavailable = g.figures.unavailable_ms;
    if unavailable == 0 {
        return;
    }
    let (start, end) = g
        .cards
        .iter()
        .map(|c| charge_period(r, c))
        .fold((i64::MAX, i64::MIN), |(a, b), (s, e)| (a.min(s), b.max(e)));
    let quantity = hours(unavailable);
    let tags = json!({ "program": g.program }).to_string();
    let mut cells: Vec<String> = vec![
        String::new(),                       // AvailabilityZone
        ZERO.into(),                         // BilledCost
        g.program.clone(),                   // BillingAccountId
        program_name(&g.program).to_owned(), // BillingAccountName
        CURRENCY.into(),                     // BillingCurrency
        utc_iso(r.until_ms),                 // BillingPeriodEnd
        utc_iso(r.from_ms),                  // BillingPeriodStart
        "Credit".into(),                     // ChargeCategory
        String::new(),                       // ChargeClass
        "SLA credit: granted GPU card-time in which the CSP's cards were lost or failed".into(),
        "Usage-Based".into(), // ChargeFrequency
        utc_iso(end),         // ChargePeriodEnd
        utc_iso(start),       // ChargePeriodStart
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),                               // ConsumedQuantity: not usage
        String::new(),                               // ConsumedUnit
        ZERO.into(),                                 // ContractedCost
        ZERO.into(),                                 // ContractedUnitPrice
        ZERO.into(),                                 // EffectiveCost
        g.csp.clone(),                               // InvoiceIssuerName
        ZERO.into(),                                 // ListCost
        ZERO.into(),                                 // ListUnitPrice
        "Other".into(),                              // PricingCategory
        quantity.clone(),                            // PricingQuantity
        GPU_HOURS.into(),                            // PricingUnit
        g.csp.clone(),                               // ProviderName
        g.csp.clone(),                               // PublisherName
        String::new(),                               // RegionId
        String::new(),                               // RegionName
        String::new(),                               // ResourceId: the grant's cards together
        String::new(),                               // ResourceName
        String::new(),                               // ResourceType
        "Compute".into(),                            // ServiceCategory
        "GPU lease".into(),                          // ServiceName
        format!("{}-gpu-hour", g.program),           // SkuId
        format!("{}/{}-gpu-hour", g.csp, g.program), // SkuPriceId
        g.grant_id.clone(),                          // SubAccountId
        g.grantee.clone(),                           // SubAccountName
        tags,                                        // Tags
        g.grant_id.clone(),                          // CapacityReservationId
        String::new(),                               // CapacityReservationStatus
        g.program.clone(),                           // x_Program
        String::new(),                               // x_HostId
        g.principal.clone(),                         // x_Principal
    ];
    // x_AllocatedGpuHours … x_Violations, x_Period: figures stay on the usage rows.
    cells.extend(std::iter::repeat_n(String::new(), 11));
    cells.push(r.period.clone());
    cells.push(quantity);
    cells.extend(compat(&g.csp, "", "Credit"));
    debug_assert_eq!(cells.len(), COLUMNS.len());
    out.record(&cells);
}

pub(super) fn render(r: &Reconciliation) -> String {
    let mut out = CsvWriter::new(false);
    out.record(&COLUMNS);
    for g in &r.grants {
        for c in &g.cards {
            card_rows(r, g, c, &mut out);
        }
        credit_row(r, g, &mut out);
    }
    out.finish()
}
