//! Metric families computed at scrape time: one descriptor and its labelled values, for the
//! prometheus-client `Collector`s of both programs. A family with no series is left out of the
//! scrape (a value that is absent is never reported as 0).

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// One series: its labels and its value.
pub type Series = (Vec<(&'static str, String)>, f64);

/// A gauge family.
pub fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[Series],
) -> std::fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, ConstGauge::new(0.0).metric_type())?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A counter family; `name` is given without `_total`, which the exposition adds.
pub fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[Series],
) -> std::fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, ConstCounter::new(0.0).metric_type())?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}
