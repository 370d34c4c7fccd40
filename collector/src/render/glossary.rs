//! The glossary: every figure a report shows, defined once, in Korean and English.
//!
//! Each report shows these same words: the HTML page (a definition list), the spreadsheet CSV
//! (its `definition` row, one definition under each figure's column), `report --help`, and the
//! notes under the terminal tables. The definitions follow `crate::reconcile`'s rules; when a
//! rule changes, this is the one text to change with it.
//!
//! Three utilizations exist and each has its own name: `utilization_pct` (a grant's, program's
//! or CSP's: active ÷ allocated), `card_util_pct` (a card's in the usage view: its mean
//! utilization over metered time) and `util_while_occupied_pct` (a tenant's: active ÷ occupied). Every column that
//! shows one names its formula in its header.

use super::Lang;

/// One defined term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    /// The machine name (JSON key and CSV column stem).
    pub key: &'static str,
    pub en: &'static str,
    pub ko: &'static str,
    pub en_def: &'static str,
    pub ko_def: &'static str,
}

impl Term {
    /// The term's name in `lang`.
    pub fn name(&self, lang: Lang) -> &'static str {
        match lang {
            Lang::Ko => self.ko,
            Lang::En => self.en,
        }
    }

    /// The definition in `lang`.
    pub fn definition(&self, lang: Lang) -> &'static str {
        match lang {
            Lang::Ko => self.ko_def,
            Lang::En => self.en_def,
        }
    }
}

/// Every figure, in report order.
pub const TERMS: [Term; 18] = [
    Term {
        key: "allocated",
        en: "Allocated",
        ko: "배정",
        en_def: "GPU-hours granted in the elapsed part of the period: each card's time in its grant, by the calendar, whatever was metered.",
        ko_def: "기간 중 경과한 부분에서 과제에 배정된 GPU시간. 계측 여부와 관계없이 달력 기준으로 셉니다.",
    },
    Term {
        key: "unmetered",
        en: "Unmetered",
        ko: "미계측",
        en_def: "Allocated time no signed record covers (agent down, records missing, failed reads).",
        ko_def: "배정 시간 중 서명된 계측 기록이 없는 시간(에이전트 중단, 기록 누락, 측정 실패).",
    },
    Term {
        key: "unavailable",
        en: "Unavailable",
        ko: "장애",
        en_def: "Metered allocated time in which the card was lost or failed (XID 79 and the like); the CSP's side of the SLA, credited in FOCUS.",
        ko_def: "계측된 배정 시간 중 GPU가 유실·고장 상태였던 시간(XID 79 등). CSP 책임 시간으로 FOCUS에서 크레딧으로 표시됩니다.",
    },
    Term {
        key: "delivered",
        en: "Delivered",
        ko: "제공",
        en_def: "Allocated − unmetered − unavailable: card-time proven delivered to the grantee, what the CSP is paid for.",
        ko_def: "배정 − 미계측 − 장애. 수혜기관에 제공된 것이 입증된 시간으로 CSP 정산의 기준입니다.",
    },
    Term {
        key: "occupied",
        en: "Occupied",
        ko: "점유",
        en_def: "Delivered time in which the grantee had at least one process on the card.",
        ko_def: "제공 시간 중 수혜기관의 프로세스가 하나 이상 GPU에 있던 시간.",
    },
    Term {
        key: "active",
        en: "Active",
        ko: "활성 사용",
        en_def: "Utilization-weighted grantee time: Σ window × GPU utilization × the grantee's share of it.",
        ko_def: "사용률 가중 시간: Σ 구간 × GPU 사용률 × 수혜기관 몫.",
    },
    Term {
        key: "idle",
        en: "Idle",
        ko: "유휴",
        en_def: "Delivered − occupied: delivered time with no process of the grantee on the card.",
        ko_def: "제공 − 점유. 수혜기관의 프로세스가 없던 제공 시간.",
    },
    Term {
        key: "foreign",
        en: "Foreign use",
        ko: "타 사용자 사용",
        en_def: "Time in which processes not of the grantee ran on the grantee's cards.",
        ko_def: "수혜기관이 아닌 사용자의 프로세스가 과제 GPU에서 실행된 시간.",
    },
    Term {
        key: "utilization_pct",
        en: "Utilization (active ÷ allocated)",
        ko: "활용률(활성 사용 ÷ 배정)",
        en_def: "A grant's, program's or CSP's utilization: active ÷ allocated × 100.",
        ko_def: "과제·사업·CSP 활용률: 활성 사용 ÷ 배정 × 100.",
    },
    Term {
        key: "card_util_pct",
        en: "Card utilization (mean over metered time)",
        ko: "GPU 평균 사용률(계측 시간 평균)",
        en_def: "A card's GPU utilization averaged over its metered time, whoever ran on it (usage view).",
        ko_def: "계측 시간 동안 GPU 사용률의 평균(사용자 무관, 사용 현황).",
    },
    Term {
        key: "util_while_occupied_pct",
        en: "Utilization while occupied (active ÷ occupied)",
        ko: "점유 중 사용률(활성 ÷ 점유)",
        en_def: "A tenant's utilization while it held the card: active ÷ occupied × 100.",
        ko_def: "사용자가 GPU를 점유한 동안의 사용률: 활성 ÷ 점유 × 100.",
    },
    Term {
        key: "energy_kwh",
        en: "Energy (kWh)",
        ko: "전력량(kWh)",
        en_def: "Energy the grant's cards used while in the grant, from the cards' energy counters.",
        ko_def: "과제 기간 중 과제 GPU가 사용한 전력량(GPU 에너지 계수기 기준).",
    },
    Term {
        key: "violations",
        en: "Violations",
        ko: "위반(건)",
        en_def: "Episodes of a process not of the card's grantee on a card (one per card, process and assignment), counted against the grant holding the card, or as unassigned when none did.",
        ko_def: "GPU에서 수혜기관이 아닌 프로세스가 적발된 건수(GPU·프로세스·배정별 1건). 과제가 보유한 GPU면 그 과제에, 아니면 미배정으로 셉니다.",
    },
    Term {
        key: "unassigned_use",
        en: "Unassigned use",
        ko: "미배정 사용",
        en_def: "Time with processes on cards no grant held, per CSP and host; part of no grant or program.",
        ko_def: "어느 과제에도 배정되지 않은 GPU에서 프로세스가 실행된 시간(CSP·서버별). 과제·사업 합계에 포함되지 않습니다.",
    },
    Term {
        key: "not_elapsed",
        en: "Not yet elapsed",
        ko: "미경과",
        en_def: "The part of a period after the report's as-of time: counted in no figure, allocated included.",
        ko_def: "보고서 기준 시각 이후의 기간. 배정을 포함한 어떤 수치에도 포함되지 않습니다.",
    },
    Term {
        key: "identity_alarms",
        en: "Card identity alarms",
        ko: "GPU 식별 경보",
        en_def: "Alarms on a card of the report: under the same UUID it reported a model, serial or memory size other than those it first reported, or it is not the model its grant names. Every such alarm raised up to the report's ledger head is listed, however long before the period.",
        ko_def: "보고서의 GPU에 대한 경보: 같은 UUID로 처음 보고된 때와 다른 모델·시리얼·메모리 크기를 보고했거나, 과제가 지정한 모델이 아닌 경우. 보고서의 원장 헤드까지 발생한 모든 경보를 보입니다.",
    },
    Term {
        key: "gpu_equivalents",
        en: "GPU-equivalents",
        ko: "GPU 환산",
        en_def: "How many whole GPUs a card is: a whole GPU is 1; a MIG instance is its compute slices ÷ its parent GPU's slices (a 1g.10gb instance of a 7-slice A100 is 1/7), as the agent reports them; a card whose slices are unknown counts as 1. GPU-equivalent hours are each card's hours × its GPU-equivalents, so seven 1/7 instances for an hour make one GPU-hour.",
        ko_def: "GPU 한 장을 기준으로 한 환산 값: 일반 GPU는 1, MIG 인스턴스는 인스턴스의 연산 슬라이스 ÷ 상위 GPU의 슬라이스(7슬라이스 A100의 1g.10gb 인스턴스는 1/7)이며 에이전트가 보고한 값을 씁니다. 슬라이스를 모르면 1로 셉니다. GPU 환산 시간은 GPU별 시간 × 환산 값으로, 1/7 인스턴스 7개를 1시간 쓰면 1 GPU시간입니다.",
    },
    Term {
        key: "time_zone",
        en: "Times",
        ko: "시각",
        en_def: "Every time is Korea Standard Time (KST, UTC+9, Asia/Seoul); end dates are inclusive; figures are GPU-hours (one GPU for one hour).",
        ko_def: "모든 시각은 한국 표준시(KST, UTC+9, Asia/Seoul)이고 종료일은 그날을 포함합니다. 시간 수치는 GPU시간(GPU 1장 × 1시간)입니다.",
    },
];

/// The term named `key`.
pub fn term(key: &str) -> Option<&'static Term> {
    TERMS.iter().find(|t| t.key == key)
}

/// The glossary as plain text lines (`Name: definition`), for terminals and `--help`.
pub fn text(lang: Lang) -> String {
    let mut out = String::new();
    for t in &TERMS {
        out.push_str(&format!("  {}: {}\n", t.name(lang), t.definition(lang)));
    }
    out
}

/// Both languages, for `report --help`.
pub fn help_text() -> String {
    format!(
        "Figures (용어 정의):\n{}\n{}",
        text(Lang::En),
        text(Lang::Ko)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_term_is_defined_once_in_both_languages() {
        let mut keys: Vec<&str> = TERMS.iter().map(|t| t.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), TERMS.len());
        for t in &TERMS {
            assert!(!t.en_def.is_empty() && !t.ko_def.is_empty(), "{}", t.key);
            assert!(
                t.ko_def.chars().any(|c| ('가'..='힣').contains(&c)),
                "{}",
                t.key
            );
        }
        let help = help_text();
        assert!(help.contains("Delivered: Allocated − unmetered − unavailable"));
        assert!(help.contains("제공: 배정 − 미계측 − 장애"));
        assert!(term("utilization_pct").is_some_and(|t| t.en.contains("active ÷ allocated")));
    }
}
