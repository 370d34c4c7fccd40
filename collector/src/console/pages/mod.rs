//! The console's pages: each a plain function from what it reads (the store, a period's
//! [`Report`](super::data::Report)) to HTML, so the handlers, the tests and the benchmark
//! render them alike. None has a formula of its own: figures are the report's, listings the
//! Query service's and [`crate::listing`]'s.

pub mod card;
pub mod fleet;
pub mod grants;
pub mod ledger;
pub mod lists;

use std::fmt::Write as _;

use super::html::esc;
use super::i18n::T;
use super::session::Session;
use crate::store::{Store, StoreError};

/// Rows per page of a long list.
pub const PER_PAGE: usize = 50;

/// Why a page cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Query(String),
}

impl From<tonic::Status> for PageError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::NotFound => PageError::NotFound(s.message().to_string()),
            tonic::Code::InvalidArgument => PageError::BadRequest(s.message().to_string()),
            _ => PageError::Query(s.message().to_string()),
        }
    }
}

/// What every page is rendered with.
pub struct Ctx<'a> {
    pub t: &'static T,
    pub session: &'a Session,
    pub store: &'a dyn Store,
    /// The page's own path and query (the language switch comes back to it).
    pub path: &'a str,
    pub now_ms: i64,
}

impl<'a> Ctx<'a> {
    pub fn new(
        t: &'static T,
        session: &'a Session,
        store: &'a dyn Store,
        path: &'a str,
        now_ms: i64,
    ) -> Self {
        Self {
            t,
            session,
            store,
            path,
            now_ms,
        }
    }

    pub fn page(&self, nav: super::html::Nav, title: &str, body: &str) -> String {
        super::html::page(self.t, Some(self.session), nav, self.path, title, body)
    }
}

/// A card state's badge, with each state's label for the script to switch between.
pub fn state_badge(t: &T, state: &str) -> String {
    let (ok, idle, viol, off, lost, un, conn, disc) = match t.lang {
        super::i18n::Lang::Ko => (
            "정상",
            "유휴",
            "위반",
            "미보고",
            "장애",
            "미배정",
            "연결됨",
            "끊김",
        ),
        super::i18n::Lang::En => (
            "ok",
            "idle",
            "violating",
            "off",
            "lost",
            "unassigned",
            "connected",
            "disconnected",
        ),
    };
    let label = match state {
        "ok" => ok,
        "idle" => idle,
        "violating" => viol,
        "off" => off,
        "lost" => lost,
        "unassigned" => un,
        "connected" => conn,
        "disconnected" => disc,
        _ => "…",
    };
    format!(
        "<span class=\"state {s}\" data-state=\"{s}\" data-label-ok=\"{ok}\" data-label-idle=\"{idle}\" \
data-label-violating=\"{viol}\" data-label-off=\"{off}\" data-label-lost=\"{lost}\" \
data-label-unassigned=\"{un}\" data-label-connected=\"{conn}\" data-label-disconnected=\"{disc}\">{label}</span>",
        s = esc(state)
    )
}

/// The period chooser and the report's head, at the top of every period page.
pub fn period_line(
    t: &T,
    r: &super::data::Report,
    action: &str,
    hidden: &[(&str, &str)],
) -> String {
    let mut s = format!(
        "<form class=\"filters\" method=\"get\" action=\"{}\"><label>{}<input name=\"period\" value=\"{}\" size=\"22\"></label>",
        esc(action),
        t.labels().period,
        esc(&r.period)
    );
    for (k, v) in hidden {
        if !v.is_empty() {
            let _ = write!(
                s,
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                esc(k),
                esc(v)
            );
        }
    }
    let _ = write!(
        s,
        "<button type=\"submit\">{}</button><span class=\"muted\">{} {} · <span id=\"report-head\" data-head=\"{}\">head #{}</span> ({})</span></form>",
        t.apply,
        t.as_of,
        esc(&crate::render::kst_minute(r.rec.as_of_ms)),
        r.head.id,
        r.head.id,
        esc(&crate::render::kst_minute(r.head.at_ms)),
    );
    s
}

/// The login page.
pub fn login(t: &T, next: &str, refused: bool) -> String {
    let mut body = String::from("<section class=\"login\">");
    if refused {
        let _ = write!(
            body,
            "<p class=\"error\" id=\"refused\">{}</p>",
            t.login_refused
        );
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/login\"><label for=\"token\">{}</label>\
<input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"off\" required>\
<input type=\"hidden\" name=\"next\" value=\"{}\">\
<button type=\"submit\" id=\"login\">{}</button></form><p class=\"muted\">{}</p></section>",
        t.login_token,
        esc(next),
        t.login_button,
        t.login_note
    );
    super::html::page(
        t,
        None,
        super::html::Nav::None,
        "/login",
        t.login_title,
        &body,
    )
}
