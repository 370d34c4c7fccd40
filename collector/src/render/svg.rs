//! Inline SVG charts for the HTML page: grouped horizontal bars and a day-by-card heatmap.
//!
//! The charts are plain SVG elements with fixed geometry computed here, so the page needs no
//! script and no library to draw them. Every element a test or a reader may want to find has
//! an id or a class (`bar <series>`, `cell`), and every mark carries a `<title>` with its exact
//! value, which browsers show on hover. All text goes through [`esc`].

/// `s` escaped for HTML text and attribute values (grantee names are user input).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

/// `v` with `decimals` decimals and thousands separators (`12,345.6`).
pub fn num(v: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(i, f)| (i, f));
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    let sign = if v < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0') {
        "-"
    } else {
        ""
    };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// One series of a bar chart.
pub struct Series<'a> {
    /// CSS class of its bars (`allocated`, `delivered`, ...); also part of each bar's id.
    pub class: &'a str,
    pub label: &'a str,
}

/// One group of bars: a label and one value per series.
pub struct BarGroup {
    pub label: String,
    /// Shown on hover over the label.
    pub title: String,
    pub values: Vec<f64>,
}

const LABEL_W: f64 = 300.0;
const BARS_W: f64 = 520.0;
const VALUE_W: f64 = 110.0;
const BAR_H: f64 = 11.0;
const BAR_GAP: f64 = 2.0;
const GROUP_GAP: f64 = 12.0;
const LEGEND_H: f64 = 26.0;

/// A grouped horizontal bar chart: per group, one bar per series, all on one scale from 0 to
/// the largest value. Bars are `<rect id="{id}-{group}-{class}" class="bar {class}">`.
pub fn grouped_bars(id: &str, series: &[Series<'_>], groups: &[BarGroup], unit: &str) -> String {
    let n = series.len().max(1) as f64;
    let group_h = n * (BAR_H + BAR_GAP) + GROUP_GAP;
    let width = LABEL_W + BARS_W + VALUE_W;
    let height = LEGEND_H + group_h * groups.len() as f64 + 4.0;
    let max = groups
        .iter()
        .flat_map(|g| g.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { BARS_W / max } else { 0.0 };
    let mut s = format!(
        "<svg id=\"{id}\" class=\"chart bars\" role=\"img\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">",
        id = esc(id)
    );
    // Legend.
    let mut x = LABEL_W;
    for se in series {
        s.push_str(&format!(
            "<rect class=\"legend {c}\" x=\"{x}\" y=\"6\" width=\"12\" height=\"12\"></rect><text class=\"legend-text\" x=\"{tx}\" y=\"16\">{l}</text>",
            c = esc(se.class),
            tx = x + 16.0,
            l = esc(se.label)
        ));
        x += 24.0 + 9.0 * se.label.chars().count() as f64;
    }
    for (gi, g) in groups.iter().enumerate() {
        let y0 = LEGEND_H + gi as f64 * group_h;
        s.push_str(&format!(
            "<text class=\"group-label\" x=\"{x}\" y=\"{y}\" text-anchor=\"end\"><title>{t}</title>{l}</text>",
            x = LABEL_W - 8.0,
            y = y0 + (n * (BAR_H + BAR_GAP)) / 2.0 + 4.0,
            t = esc(&g.title),
            l = esc(&clip(&g.label, 40))
        ));
        for (si, se) in series.iter().enumerate() {
            let v = g.values.get(si).copied().unwrap_or(0.0);
            let w = if v.is_finite() && v > 0.0 {
                v * scale
            } else {
                0.0
            };
            let y = y0 + si as f64 * (BAR_H + BAR_GAP);
            s.push_str(&format!(
                "<rect id=\"{id}-{gi}-{c}\" class=\"bar {c}\" x=\"{LABEL_W}\" y=\"{y}\" width=\"{w:.2}\" height=\"{BAR_H}\" data-value=\"{v}\"><title>{t} · {sl}: {vs} {unit}</title></rect>",
                id = esc(id),
                c = esc(se.class),
                t = esc(&g.title),
                sl = esc(se.label),
                vs = num(v, 2),
                unit = esc(unit),
            ));
            s.push_str(&format!(
                "<text class=\"value\" x=\"{x:.2}\" y=\"{ty}\">{vs}</text>",
                x = LABEL_W + w + 4.0,
                ty = y + BAR_H - 1.5,
                vs = num(v, 1)
            ));
        }
    }
    s.push_str("</svg>");
    s
}

/// One line of a line chart: a label and one value per x position (`None`: no point).
pub struct Line {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

const LINE_W: f64 = 720.0;
const LINE_H: f64 = 240.0;
const LINE_LEFT: f64 = 56.0;
const LINE_TOP: f64 = 12.0;
const LINE_LEGEND_W: f64 = 260.0;
const PALETTE: [&str; 8] = [
    "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b", "#8c6d31", "#17becf",
];

/// A line chart over `x` labels (months), on one scale from 0 to `max` (or the largest value).
/// Lines are `<polyline id="{id}-{i}" class="line">`, each point a `<circle class="point">`
/// with its exact value in a `<title>`.
pub fn line_chart(id: &str, x: &[String], lines: &[Line], unit: &str, max: Option<f64>) -> String {
    let top = max.unwrap_or_else(|| {
        lines
            .iter()
            .flat_map(|l| l.values.iter().flatten().copied())
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max)
    });
    let top = if top > 0.0 { top } else { 1.0 };
    let width = LINE_LEFT + LINE_W + LINE_LEGEND_W;
    let height = LINE_TOP + LINE_H + 40.0;
    let step = if x.len() > 1 {
        LINE_W / (x.len() - 1) as f64
    } else {
        0.0
    };
    let px = |i: usize| LINE_LEFT + step * i as f64;
    let py = |v: f64| LINE_TOP + LINE_H - (v / top).clamp(0.0, 1.0) * LINE_H;
    let mut s = format!(
        "<svg id=\"{id}\" class=\"chart lines\" role=\"img\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">",
        id = esc(id)
    );
    // Axes: 0, half and the top, in `unit`.
    for f in [0.0, 0.5, 1.0] {
        let y = py(top * f);
        s.push_str(&format!(
            "<line class=\"grid\" x1=\"{LINE_LEFT}\" x2=\"{x2}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#d9e2ec\"></line><text class=\"axis\" x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{v}</text>",
            x2 = LINE_LEFT + LINE_W,
            tx = LINE_LEFT - 6.0,
            ty = y + 4.0,
            v = esc(&format!("{} {unit}", num(top * f, 1)))
        ));
    }
    for (i, m) in x.iter().enumerate() {
        s.push_str(&format!(
            "<text class=\"axis month\" x=\"{x}\" y=\"{y}\" text-anchor=\"middle\">{m}</text>",
            x = px(i),
            y = LINE_TOP + LINE_H + 18.0,
            m = esc(m)
        ));
    }
    for (li, l) in lines.iter().enumerate() {
        let colour = PALETTE[li % PALETTE.len()];
        let points: Vec<String> = l
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", px(i), py(v))))
            .collect();
        s.push_str(&format!(
            "<polyline id=\"{id}-{li}\" class=\"line\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{p}\"></polyline>",
            id = esc(id),
            p = points.join(" ")
        ));
        for (i, v) in l.values.iter().enumerate() {
            if let Some(v) = v {
                s.push_str(&format!(
                    "<circle class=\"point\" cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"3\" fill=\"{colour}\"><title>{t} · {m}: {v} {unit}</title></circle>",
                    cx = px(i),
                    cy = py(*v),
                    t = esc(&l.label),
                    m = esc(x.get(i).map_or("", String::as_str)),
                    v = num(*v, 1),
                    unit = esc(unit)
                ));
            }
        }
        let ly = LINE_TOP + 14.0 * li as f64 + 8.0;
        let lx = LINE_LEFT + LINE_W + 16.0;
        s.push_str(&format!(
            "<rect x=\"{lx}\" y=\"{y}\" width=\"12\" height=\"3\" fill=\"{colour}\"></rect><text class=\"legend-text\" x=\"{tx}\" y=\"{ty}\">{l}</text>",
            y = ly - 3.0,
            tx = lx + 16.0,
            ty = ly + 1.0,
            l = esc(&clip(&l.label, 32))
        ));
    }
    s.push_str("</svg>");
    s
}

/// A heatmap cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell {
    /// The card did not belong to the grant that day.
    NotAllocated,
    /// Allocated, but nothing was metered.
    NoData,
    /// Utilization in percent.
    Pct(f64),
    /// The day is after the report's as-of: not yet elapsed, counted in no figure.
    NotElapsed,
}

const CELL_W: f64 = 20.0;
const CELL_H: f64 = 16.0;
const ROW_LABEL_W: f64 = 250.0;
const HEAD_H: f64 = 34.0;

/// Colour of a utilization: light (0 %) to dark blue (100 %), through a middle blue.
pub fn heat_colour(pct: f64) -> String {
    let t = (pct / 100.0).clamp(0.0, 1.0);
    let stops = [(0xee, 0xf3, 0xfb), (0x6b, 0xae, 0xd6), (0x08, 0x30, 0x6b)];
    let (a, b, u) = if t < 0.5 {
        (stops[0], stops[1], t * 2.0)
    } else {
        (stops[1], stops[2], (t - 0.5) * 2.0)
    };
    let mix = |x: i32, y: i32| (f64::from(x) + (f64::from(y) - f64::from(x)) * u).round() as i32;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(a.0, b.0),
        mix(a.1, b.1),
        mix(a.2, b.2)
    )
}

/// A day-by-card heatmap: `rows` (label, hover title) by `days` (`YYYY-MM-DD`), `cells[row][day]`.
/// Cells are `<rect class="cell">` (with `nodata` or `unallocated` when they have no value).
pub fn heatmap(
    id: &str,
    rows: &[(String, String)],
    days: &[String],
    cells: &[Vec<Cell>],
) -> String {
    let width = ROW_LABEL_W + CELL_W * days.len() as f64 + 8.0;
    let height = HEAD_H + CELL_H * rows.len() as f64 + 4.0;
    let mut s = format!(
        "<svg id=\"{id}\" class=\"chart heatmap\" role=\"img\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">",
        id = esc(id)
    );
    for (di, d) in days.iter().enumerate() {
        // The day of the month, with the year and month above the first day and every 1st.
        let (month, dom) = (d.get(..7).unwrap_or(""), d.get(8..10).unwrap_or(d.as_str()));
        let x = ROW_LABEL_W + di as f64 * CELL_W + CELL_W / 2.0;
        if di == 0 || dom == "01" {
            s.push_str(&format!(
                "<text class=\"axis month\" x=\"{mx}\" y=\"12\">{m}</text>",
                mx = x - CELL_W / 2.0 + 1.0,
                m = esc(month)
            ));
        }
        s.push_str(&format!(
            "<text class=\"axis\" x=\"{x}\" y=\"{y}\" text-anchor=\"middle\"><title>{t}</title>{dom}</text>",
            y = HEAD_H - 6.0,
            t = esc(d),
            dom = esc(dom)
        ));
    }
    for (ri, (label, title)) in rows.iter().enumerate() {
        let y = HEAD_H + ri as f64 * CELL_H;
        s.push_str(&format!(
            "<text class=\"row-label\" x=\"{x}\" y=\"{ty}\" text-anchor=\"end\"><title>{t}</title>{l}</text>",
            x = ROW_LABEL_W - 6.0,
            ty = y + CELL_H - 4.0,
            t = esc(title),
            l = esc(&clip(label, 34))
        ));
        for (di, d) in days.iter().enumerate() {
            let cell = cells
                .get(ri)
                .and_then(|r| r.get(di))
                .copied()
                .unwrap_or(Cell::NotAllocated);
            let (class, fill, text) = match cell {
                Cell::NotAllocated => ("cell unallocated", "#ffffff".to_owned(), String::new()),
                Cell::NoData => ("cell nodata", "#bdbdbd".to_owned(), String::new()),
                Cell::NotElapsed => ("cell future", "#f5f0e1".to_owned(), String::new()),
                Cell::Pct(p) => ("cell", heat_colour(p), format!("{}%", num(p, 1))),
            };
            s.push_str(&format!(
                "<rect class=\"{class}\" x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" fill=\"{fill}\"><title>{t} {d} {text}</title></rect>",
                x = ROW_LABEL_W + di as f64 * CELL_W + 1.0,
                y = y + 1.0,
                w = CELL_W - 2.0,
                h = CELL_H - 2.0,
                t = esc(title),
                d = esc(d),
            ));
        }
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(esc("한국대학교"), "한국대학교");
    }

    #[test]
    fn numbers_group_thousands() {
        assert_eq!(num(1234567.891, 2), "1,234,567.89");
        assert_eq!(num(999.0, 0), "999");
        assert_eq!(num(0.04, 1), "0.0");
        assert_eq!(num(-1234.5, 1), "-1,234.5");
        assert_eq!(num(-0.01, 1), "0.0");
    }

    #[test]
    fn clip_cuts_by_characters() {
        assert_eq!(clip("한국대학교 인공지능연구소", 6), "한국대학교…");
        assert_eq!(clip("short", 10), "short");
    }

    #[test]
    fn heat_colours_run_light_to_dark() {
        assert_eq!(heat_colour(0.0), "#eef3fb");
        assert_eq!(heat_colour(50.0), "#6baed6");
        assert_eq!(heat_colour(100.0), "#08306b");
        assert_eq!(heat_colour(250.0), "#08306b");
    }

    #[test]
    fn bars_scale_to_the_largest_value() {
        let svg = grouped_bars(
            "c",
            &[
                Series {
                    class: "allocated",
                    label: "A",
                },
                Series {
                    class: "active",
                    label: "B",
                },
            ],
            &[BarGroup {
                label: "<g>".into(),
                title: "t".into(),
                values: vec![10.0, 5.0],
            }],
            "h",
        );
        assert!(
            svg.contains(
                "id=\"c-0-allocated\" class=\"bar allocated\" x=\"300\" y=\"26\" width=\"520.00\""
            ),
            "{svg}"
        );
        assert!(
            svg.contains(
                "id=\"c-0-active\" class=\"bar active\" x=\"300\" y=\"39\" width=\"260.00\""
            ),
            "{svg}"
        );
        assert!(svg.contains("&lt;g&gt;") && !svg.contains("<g>"), "{svg}");
    }
}
