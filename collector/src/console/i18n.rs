//! The console's words in Korean and English. Figure names (allocated, delivered, …) and
//! program names come from the reports' own label tables ([`crate::render::labels`]), so the
//! console and the reports never name a figure differently; only the console's own words are
//! here.
//!
//! The language is the `gpm_lang` cookie's when set (the switch in every page's header sets
//! it), else the first of `ko`/`en` in `Accept-Language`, else Korean.

use crate::render::Labels;
pub use crate::render::Lang;

/// The language cookie's name.
pub const LANG_COOKIE: &str = "gpm_lang";

/// The language a request asks for.
pub fn choose(cookie: Option<&str>, accept_language: Option<&str>) -> Lang {
    match cookie {
        Some("ko") => return Lang::Ko,
        Some("en") => return Lang::En,
        _ => {}
    }
    let Some(al) = accept_language else {
        return Lang::Ko;
    };
    let mut best: Option<(f32, Lang)> = None;
    for part in al.split(',') {
        let mut it = part.trim().split(';');
        let tag = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
            })
            .unwrap_or(1.0);
        let lang = match tag.split('-').next() {
            Some("ko") => Lang::Ko,
            Some("en") => Lang::En,
            _ => continue,
        };
        if best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, lang));
        }
    }
    best.map_or(Lang::Ko, |(_, l)| l)
}

/// The console's words in one language.
#[derive(Debug)]
pub struct T {
    pub lang: Lang,
    pub switch_to: &'static str,
    pub logout: &'static str,
    pub footer: &'static str,
    pub prev: &'static str,
    pub next: &'static str,
    pub nav_fleet: &'static str,
    pub nav_grants: &'static str,
    pub nav_violations: &'static str,
    pub nav_alarms: &'static str,
    pub nav_idle: &'static str,
    pub nav_downloads: &'static str,
    pub nav_ledger: &'static str,
    pub nav_admin: &'static str,
    pub login_title: &'static str,
    pub login_token: &'static str,
    pub login_button: &'static str,
    pub login_note: &'static str,
    pub login_refused: &'static str,
    pub fleet_title: &'static str,
    pub hosts_title: &'static str,
    pub committed: &'static str,
    pub registered: &'static str,
    pub healthy: &'static str,
    pub granted: &'static str,
    pub delivered_cards: &'static str,
    pub connected: &'static str,
    pub disconnected: &'static str,
    pub last_seen: &'static str,
    pub last_record: &'static str,
    pub state: &'static str,
    pub no_registry: &'static str,
    pub apply: &'static str,
    pub grant_title: &'static str,
    pub heatmap: &'static str,
    pub hourly: &'static str,
    pub tenants: &'static str,
    pub jobs: &'static str,
    pub history: &'static str,
    pub card_title: &'static str,
    pub identity: &'static str,
    pub windows: &'static str,
    pub events: &'static str,
    pub xids: &'static str,
    pub enforcement: &'static str,
    pub holdings: &'static str,
    pub moves: &'static str,
    pub live_now: &'static str,
    pub day: &'static str,
    pub alarms_title: &'static str,
    pub downloads_title: &'static str,
    pub downloads_note: &'static str,
    pub format: &'static str,
    pub ledger_title: &'static str,
    pub verify_now: &'static str,
    pub verify_never: &'static str,
    pub verify_ok: &'static str,
    pub verify_failed: &'static str,
    pub verify_running: &'static str,
    pub latest_head: &'static str,
    pub no_head: &'static str,
    pub tokens_title: &'static str,
    pub agents_title: &'static str,
    pub forbidden: &'static str,
    pub not_found: &'static str,
    pub none: &'static str,
    pub as_of: &'static str,
    pub occupied_days: &'static str,
    pub evidence: &'static str,
    pub action: &'static str,
    pub result: &'static str,
    pub kind: &'static str,
    pub detail: &'static str,
    pub time: &'static str,
    pub name: &'static str,
    pub role: &'static str,
    pub created: &'static str,
    pub revoked: &'static str,
}

impl T {
    /// The reports' label table in this language (figure and program names).
    pub fn labels(&self) -> &'static Labels {
        self.lang.labels()
    }

    pub fn of(lang: Lang) -> &'static T {
        match lang {
            Lang::Ko => &KO,
            Lang::En => &EN,
        }
    }
}

pub static KO: T = T {
    lang: Lang::Ko,
    switch_to: "English",
    logout: "로그아웃",
    footer: "gpumeter 콘솔 · 읽기 전용 · 모든 시각은 KST(UTC+9)",
    prev: "이전",
    next: "다음",
    nav_fleet: "현황",
    nav_grants: "과제",
    nav_violations: "위반",
    nav_alarms: "경보",
    nav_idle: "유휴 과제",
    nav_downloads: "보고서",
    nav_ledger: "원장 검증",
    nav_admin: "관리",
    login_title: "gpumeter 콘솔 로그인",
    login_token: "감사자 또는 관리자 토큰",
    login_button: "로그인",
    login_note: "토큰은 세션을 만드는 데만 쓰이고 저장되지 않습니다.",
    login_refused: "토큰이 거부되었습니다.",
    fleet_title: "GPU 현황",
    hosts_title: "서버 연결 상태",
    committed: "약정",
    registered: "등록",
    healthy: "정상",
    granted: "배정",
    delivered_cards: "제공",
    connected: "연결됨",
    disconnected: "끊김",
    last_seen: "최근 접속",
    last_record: "최근 기록",
    state: "상태",
    no_registry: "등록된 CSP가 없어 CSP별 약정 현황이 없습니다.",
    apply: "적용",
    grant_title: "과제",
    heatmap: "일별 활용률",
    hourly: "시간별 활용률",
    tenants: "사용자",
    jobs: "작업",
    history: "변경 이력",
    card_title: "GPU",
    identity: "식별 정보",
    windows: "측정 구간",
    events: "이벤트",
    xids: "XID",
    enforcement: "조치",
    holdings: "배정 이력",
    moves: "서버 이동",
    live_now: "실시간",
    day: "일자",
    alarms_title: "경보",
    downloads_title: "보고서 내려받기",
    downloads_note: "모든 파일에는 계산 기준이 된 서명된 원장 헤드와 내용 해시(provenance)가 들어 있습니다. verify-report로 확인할 수 있습니다.",
    format: "형식",
    ledger_title: "원장 검증",
    verify_now: "지금 검증",
    verify_never: "이 콘솔은 아직 원장을 검증하지 않았습니다.",
    verify_ok: "검증 통과",
    verify_failed: "검증 실패",
    verify_running: "검증 중…",
    latest_head: "최근 서명 헤드",
    no_head: "서명된 헤드가 아직 없습니다.",
    tokens_title: "토큰",
    agents_title: "에이전트 등록",
    forbidden: "이 화면은 관리자만 볼 수 있습니다.",
    not_found: "찾을 수 없습니다.",
    none: "없음",
    as_of: "기준",
    occupied_days: "점유 시간",
    evidence: "근거",
    action: "조치",
    result: "결과",
    kind: "종류",
    detail: "내용",
    time: "시각",
    name: "이름",
    role: "역할",
    created: "생성",
    revoked: "폐기",
};

pub static EN: T = T {
    lang: Lang::En,
    switch_to: "한국어",
    logout: "Log out",
    footer: "gpumeter console · read-only · all times KST (UTC+9)",
    prev: "Previous",
    next: "Next",
    nav_fleet: "Fleet",
    nav_grants: "Grants",
    nav_violations: "Violations",
    nav_alarms: "Alarms",
    nav_idle: "Idle grants",
    nav_downloads: "Reports",
    nav_ledger: "Ledger",
    nav_admin: "Admin",
    login_title: "gpumeter console login",
    login_token: "Auditor or admin token",
    login_button: "Log in",
    login_note: "The token only opens a session; it is not kept.",
    login_refused: "The token was refused.",
    fleet_title: "Fleet",
    hosts_title: "Hosts and their connections",
    committed: "committed",
    registered: "registered",
    healthy: "healthy",
    granted: "granted",
    delivered_cards: "delivered",
    connected: "connected",
    disconnected: "disconnected",
    last_seen: "last seen",
    last_record: "last record",
    state: "state",
    no_registry: "No CSP is registered, so there are no per-CSP commitments.",
    apply: "Apply",
    grant_title: "Grant",
    heatmap: "Utilization per day",
    hourly: "Utilization per hour",
    tenants: "Tenants",
    jobs: "Jobs",
    history: "History",
    card_title: "Card",
    identity: "Identity",
    windows: "Windows",
    events: "Events",
    xids: "XIDs",
    enforcement: "Enforcement actions",
    holdings: "Grants holding it",
    moves: "Moves between hosts",
    live_now: "Live",
    day: "Day",
    alarms_title: "Alarms",
    downloads_title: "Report downloads",
    downloads_note: "Every file names the signed ledger head it was computed from and its content hash (provenance); check it with verify-report.",
    format: "Format",
    ledger_title: "Ledger verification",
    verify_now: "Verify now",
    verify_never: "This console has not verified the ledger yet.",
    verify_ok: "Verified",
    verify_failed: "Verification failed",
    verify_running: "Verifying…",
    latest_head: "Latest signed head",
    no_head: "No head has been signed yet.",
    tokens_title: "Tokens",
    agents_title: "Agent registrations",
    forbidden: "Only an admin may see this page.",
    not_found: "Not found.",
    none: "none",
    as_of: "as of",
    occupied_days: "occupied",
    evidence: "evidence",
    action: "action",
    result: "result",
    kind: "kind",
    detail: "detail",
    time: "time",
    name: "name",
    role: "role",
    created: "created",
    revoked: "revoked",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_wins_then_accept_language_then_korean() {
        assert_eq!(choose(Some("en"), Some("ko-KR")), Lang::En);
        assert_eq!(choose(None, Some("en-US,en;q=0.9,ko;q=0.8")), Lang::En);
        assert_eq!(choose(None, Some("fr,ko;q=0.5,en;q=0.4")), Lang::Ko);
        assert_eq!(choose(None, Some("fr")), Lang::Ko);
        assert_eq!(choose(Some("xx"), None), Lang::Ko);
    }
}
