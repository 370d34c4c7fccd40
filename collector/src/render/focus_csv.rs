//! The FOCUS CSV: the reconciliation as a FinOps Open Cost and Usage Specification 1.0 dataset.
//!
//! Format: UTF-8 without a byte order mark (it is for tools, not spreadsheets), RFC 4180
//! quoting, CRLF line ends, a header of column ids. Columns: the 43 of FOCUS 1.0, then
//! `CapacityReservationId` and `CapacityReservationStatus` (defined by FOCUS 1.1; a 1.0
//! reader ignores them), then gpumeter's own figures as `x_` columns.
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
//! `x_` columns: `x_Program`, `x_HostId` and `x_Principal` on every row; the card's figures
//! over the period (`x_AllocatedGpuHours` … `x_Violations`) on its `Used` row only, empty on
//! the `Unused` row, so that a column summed over the file is the report's total.

use serde_json::json;

use crate::reconcile::{CardRow, GrantRow, Reconciliation};

use super::report_csv::{hours, push_record};
use super::utc_iso;

/// The header: FOCUS 1.0's columns, the two 1.1 capacity reservation columns, and ours.
pub const COLUMNS: [&str; 60] = [
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

fn card_rows(r: &Reconciliation, g: &GrantRow, c: &CardRow, out: &mut String) {
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
        push_record(out, &row);
    }
}

pub(super) fn render(r: &Reconciliation) -> String {
    let mut out = String::new();
    push_record(&mut out, &COLUMNS);
    for g in &r.grants {
        for c in &g.cards {
            card_rows(r, g, c, &mut out);
        }
    }
    out
}
