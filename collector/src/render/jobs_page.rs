//! The jobs view (`report --view jobs`, see [`crate::jobs`]) as a terminal table, a
//! spreadsheet CSV (the shared writer: BOM, CRLF, formula guard) and a self-contained HTML
//! page. Every time is KST; GPU-hours are the job's occupied card time.

use crate::jobs::JobRow;

use super::csv_writer::CsvWriter;
use super::kst_minute;
use super::svg::{esc, num};
use super::{Lang, trend_page::CSS};

/// The jobs CSV's columns: (machine name, Korean header).
pub const JOB_COLUMNS: [(&str, &str); 15] = [
    ("kind", "구분"),
    ("job_id", "작업 ID"),
    ("principal", "사용 주체"),
    ("uid", "UID"),
    ("grant_ids", "과제 ID"),
    ("host_ids", "서버"),
    ("gpus", "GPU 수"),
    ("first_kst", "처음(KST)"),
    ("last_kst", "마지막(KST)"),
    ("windows", "구간 수"),
    ("gpu_hours", "점유(GPU시간)"),
    ("active_gpu_hours", "활성 사용(GPU시간)"),
    ("memory_max_gib", "최대 메모리(GiB)"),
    ("gpu_uuids", "GPU UUID"),
    ("k8s_pod", "파드"),
];

fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
}

fn cells(j: &JobRow) -> Vec<String> {
    vec![
        j.kind.clone(),
        j.job_id.clone(),
        j.principal.clone(),
        j.uid.map_or(String::new(), |u| u.to_string()),
        j.grant_ids.join(" "),
        j.host_ids.join(" "),
        j.gpu_uuids.len().to_string(),
        kst_minute(j.first_ms),
        kst_minute(j.last_ms),
        j.windows.to_string(),
        format!("{:.6}", j.gpu_hours),
        format!("{:.6}", j.active_gpu_hours),
        gib(j.memory_max_bytes),
        j.gpu_uuids.join(" "),
        j.k8s_pod.clone(),
    ]
}

/// The jobs as a spreadsheet CSV.
pub fn csv(jobs: &[JobRow], lang: Lang) -> String {
    let mut w = CsvWriter::new(true);
    let header: Vec<&str> = JOB_COLUMNS
        .iter()
        .map(|(en, ko)| if lang == Lang::Ko { *ko } else { *en })
        .collect();
    w.record(&header);
    for j in jobs {
        w.record(&cells(j));
    }
    w.finish()
}

/// `s` cut to `max` characters, the cut marked with `…` (ids keep their head and tail).
fn short(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_owned();
    }
    let head: String = s.chars().take(max - 5).collect();
    let tail: String = s.chars().skip(n - 4).collect();
    format!("{head}…{tail}")
}

/// The jobs as a terminal table fitting 120 columns: long ids, principals and grant lists are
/// shortened (the CSV and JSON carry them whole, with the cards' UUIDs).
pub fn table(jobs: &[JobRow], period: &str, lang: Lang) -> String {
    let ko = lang == Lang::Ko;
    let mut out = if ko {
        format!(
            "작업별 GPU 사용 {period} (시각 KST, Asia/Seoul; 점유 = 작업 프로세스가 GPU에 있던 시간)\n"
        )
    } else {
        format!(
            "GPU use per job {period} (times KST, Asia/Seoul; GPU-hours = time the job had a process on a card)\n"
        )
    };
    if jobs.is_empty() {
        out.push_str(if ko { "(없음)\n" } else { "(none)\n" });
        return out;
    }
    let header: [&str; 10] = if ko {
        [
            "구분",
            "작업",
            "사용 주체",
            "과제",
            "GPU 수",
            "처음(KST)",
            "마지막(KST)",
            "점유(GPU시간)",
            "활성",
            "메모리(GiB)",
        ]
    } else {
        [
            "KIND",
            "JOB",
            "PRINCIPAL",
            "GRANTS",
            "GPUS",
            "FIRST_KST",
            "LAST_KST",
            "GPU_HOURS",
            "ACTIVE_H",
            "MEM_GIB",
        ]
    };
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.kind.clone(),
                short(&j.job_id, 16),
                short(&j.principal, 14),
                short(&j.grant_ids.join(" "), 12),
                j.gpu_uuids.len().to_string(),
                kst_minute(j.first_ms),
                kst_minute(j.last_ms),
                format!("{:.3}", j.gpu_hours),
                format!("{:.3}", j.active_gpu_hours),
                gib(j.memory_max_bytes),
            ]
        })
        .collect();
    out.push_str(&crate::report::grid(
        &header,
        &rows,
        &[
            false, false, false, false, true, false, false, true, true, true,
        ],
    ));
    out
}

/// The jobs as one self-contained HTML page.
pub fn html(jobs: &[JobRow], period: &str, lang: Lang) -> String {
    let ko = lang == Lang::Ko;
    let title = if ko {
        "작업별 GPU 사용"
    } else {
        "GPU use per job"
    };
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"{lang}\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <title>{t} {p}</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <header><h1>{t}</h1><p class=\"note\">{p} · KST (Asia/Seoul)</p></header>\n\
         <section id=\"jobs\"><table><thead><tr>",
        lang = lang.as_str(),
        t = esc(title),
        p = esc(period),
    );
    for (en, k) in JOB_COLUMNS {
        s.push_str(&format!("<th>{}</th>", esc(if ko { k } else { en })));
    }
    s.push_str("</tr></thead><tbody>");
    for j in jobs {
        s.push_str("<tr>");
        for (i, c) in cells(j).iter().enumerate() {
            if (10..=11).contains(&i) {
                let h = if i == 10 {
                    j.gpu_hours
                } else {
                    j.active_gpu_hours
                };
                s.push_str(&format!("<td class=\"n\">{}</td>", num(h, 3)));
            } else if matches!(i, 3 | 6 | 9 | 12) {
                s.push_str(&format!("<td class=\"n\">{}</td>", esc(c)));
            } else {
                s.push_str(&format!("<td>{}</td>", esc(c)));
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></section>\n</body>\n</html>\n");
    s
}
