//! The web console (`serve --console-listen ADDR`): a read-only view of the fleet, grants,
//! cards, violations, alarms, idle grants, reports and the ledger's verification for auditors
//! and the agency, served by the collector over its own TLS.
//!
//! What it may depend on: the store (reads only), the Query service's code (reconciliation,
//! listings, timelines, verification) and the live hub ([`crate::watch`]). It never writes a
//! grant, a record or a token; the one thing a page can start is a verification run, which
//! reads. Like `report`, computing a period's figures may sign a ledger head (or reuse the
//! latest), which is the collector's own witness, not a change of the ledger's records.
//!
//! Rules:
//! - **Who.** Every page but `/login` and the assets needs a session ([`session`]); a request
//!   without one is redirected to `/login` (the live stream answers 401). Admin-only pages
//!   (tokens, agent registrations) answer 403 to an auditor's session. Tokens are checked by
//!   [`crate::auth::tokens::TokenCheck::check`], the interceptor's own check, at login, and
//!   the token's revocation is looked up at every request after.
//! - **Transport.** HTTPS only, with the collector's certificate ([`crate::auth::tls`]); no
//!   client certificate is asked for; HTTP/1.1. The console is not served by `serve
//!   --insecure` (its cookie is `Secure`).
//! - **Headers.** Every answer carries [`CSP`] (nothing from elsewhere, no inline script or
//!   style, no framing), `X-Content-Type-Options: nosniff`, `Referrer-Policy: same-origin` (with `no-referrer` a browser sends `Origin: null` on the console's own forms),
//!   `X-Frame-Options: DENY`, HSTS; pages and the live stream `Cache-Control: no-store`.
//!   Fonts, scripts and styles are embedded in the binary (`assets/`); the console uses the
//!   system's fonts and loads none.
//! - **Forms.** Every POST must come from the console's own origin (`Origin` equal to
//!   `https://` + `Host`), and but for the login form carry the session's CSRF token; the
//!   cookie is `SameSite=Strict` besides.
//! - **Figures.** A period's figures are [`crate::query::compute_report_with`] over the
//!   rollups, as the Reconcile RPC computes them, held per period ([`data::ReportCache`])
//!   and refreshed in the background after [`ConsoleOptions::report_ttl`] (pages show the
//!   head they are as of); live state comes from the hub. No page has a formula of its own.

pub mod assets;
pub mod data;
pub mod html;
pub mod i18n;
pub mod pages;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Deserialize;
use tokio::net::TcpListener;
use tonic::transport::server::Connected;

use crate::auth::tls::ServerTls;
use crate::auth::tokens::{Role, TokenCheck, token_hash};
use crate::store::Store;
use crate::watch::{Connected as IsConnected, Hub};
use i18n::{LANG_COOKIE, Lang, T};
use session::{Session, Sessions};

/// The Content-Security-Policy of every answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// How the console runs.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    pub sessions: session::SessionLimits,
    /// How long a period's computed figures are shown before they are computed again.
    pub report_ttl: Duration,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            sessions: session::SessionLimits::default(),
            report_ttl: Duration::from_secs(30),
        }
    }
}

/// What the console's handlers share.
pub struct Console {
    pub store: Arc<dyn Store>,
    pub query: crate::query::QueryService,
    pub connected: Option<IsConnected>,
    pub sessions: Sessions,
    pub logins: session::LoginLimiter,
    pub reports: data::ReportCache,
    pub verification: data::Verification,
    pub now: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Console")
    }
}

impl Console {
    pub fn new(
        query: crate::query::QueryService,
        connected: Option<IsConnected>,
        opts: &ConsoleOptions,
    ) -> Self {
        Self {
            store: query.store.clone(),
            query,
            connected,
            sessions: Sessions::new(opts.sessions),
            logins: session::LoginLimiter::default(),
            reports: data::ReportCache::new(opts.report_ttl),
            verification: data::Verification::default(),
            now: Arc::new(crate::ingest::now_ms),
        }
    }

    fn hub(&self) -> &Hub {
        &self.query.hub
    }

    /// Whether the agent has a live session with this collector.
    pub fn is_connected(&self, agent: &str) -> bool {
        self.connected.as_ref().is_some_and(|c| c(agent))
    }
}

type St = Arc<Console>;

/// The TLS config of the console: the collector's certificate, no client certificate asked
/// for, HTTP/1.1.
pub fn console_tls(tls: &ServerTls) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(tls.config.cert_resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepted, handshaken connections as axum takes them.
struct TlsListener {
    conns: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<crate::auth::tls::Conn<tokio::net::TcpStream>>,
    >,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = crate::auth::tls::Conn<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let peer = c.connect_info().remote_addr.unwrap_or(self.addr);
                    return (c, peer);
                }
                Some(Err(_)) => continue,
                // The accept task ended (shutdown): wait for the server to stop.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// The client's address, as handlers see it (`ConnectInfo<Peer>`).
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Serves the console on `listener` over `tls` until `shutdown` completes. Each TLS
/// handshake runs in its own task under the handshake timeout, as the gRPC port's do.
pub async fn serve(
    listener: TcpListener,
    tls: &ServerTls,
    console: Arc<Console>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let tls = Arc::new(ServerTls {
        config: console_tls(tls)?,
        handshake_timeout: tls.handshake_timeout,
    });
    let (conns, accept) = crate::auth::tls::incoming(
        Box::pin(crate::auth::tls::tcp_accepted(listener)),
        Some(tls),
    );
    // The current month's figures are computed now, so its first visitor does not wait.
    let now = (console.now)();
    console
        .reports
        .refresh(console.store.clone(), &data::period_or_month("", now), now);
    tracing::info!(url = %format!("https://{addr}/"), "console listening");
    let served = axum::serve(
        TlsListener { conns, addr },
        router(console).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    accept.abort();
    let _ = accept.await;
    served?;
    Ok(())
}

/// Every route of the console.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/lang/{lang}", get(set_lang))
        .route("/assets/{name}", get(asset))
        .route("/", get(fleet))
        .route("/grants", get(grants))
        .route("/grants/{id}", get(grant))
        .route("/grants/{id}/jobs", get(grant_jobs))
        .route("/cards/{uuid}", get(card))
        .route("/violations", get(violations))
        .route("/alarms", get(alarms))
        .route("/idle", get(idle))
        .route("/downloads", get(downloads))
        .route("/downloads/report", get(download))
        .route("/ledger", get(ledger))
        .route("/ledger/verify", post(verify))
        .route("/admin/tokens", get(admin_tokens))
        .route("/admin/agents", get(admin_agents))
        .route("/live", get(live))
        .fallback(not_found)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

async fn security_headers(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Who is asking

/// The language a request asks for.
fn lang_of(headers: &HeaderMap) -> Lang {
    let cookie = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| session::cookie_value(c, LANG_COOKIE));
    let al = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok());
    i18n::choose(cookie.as_deref(), al)
}

/// The live session a request names, if any; a session whose token was revoked (or is gone)
/// is ended here.
fn session_of(c: &Console, headers: &HeaderMap) -> Option<Session> {
    let id = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| session::cookie_value(h, session::COOKIE))?;
    let s = c.sessions.get(&id, (c.now)())?;
    match c.store.token_by_hash(&s.token_hash) {
        Ok(Some(row)) if row.revoked_ms.is_none() => Some(s),
        Ok(_) => {
            c.sessions.remove(&s.id);
            None
        }
        // The store is down: nothing can be shown anyway; refuse rather than guess.
        Err(_) => None,
    }
}

/// The session, or the redirect to the login page (which comes back to `path`).
/// An answer in place of a page (a redirect or a refusal), boxed: it is large.
type Refusal = Box<Response<Body>>;

fn require(c: &Console, headers: &HeaderMap, path: &str) -> Result<Session, Refusal> {
    session_of(c, headers).ok_or_else(|| {
        Box::new(Redirect::to(&format!("/login?next={}", html::url_part(path))).into_response())
    })
}

/// Whether a POST comes from this console's own origin.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    matches!((host, origin), (Some(h), Some(o)) if o == format!("https://{h}"))
}

/// A relative path of this console (never another site's: `//x` and `/\x` are refused).
fn local_path(p: &str) -> &str {
    if p.starts_with('/') && !p.starts_with("//") && !p.starts_with("/\\") {
        p
    } else {
        "/"
    }
}

fn html_response(status: StatusCode, body: String) -> Response<Body> {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn error_page(t: &T, s: Option<&Session>, status: StatusCode, msg: &str) -> Response<Body> {
    let body = format!("<p class=\"error\">{}</p>", html::esc(msg));
    html_response(
        status,
        html::page(t, s, html::Nav::None, "/", &status.to_string(), &body),
    )
}

fn forbidden(t: &T, s: &Session) -> Response<Body> {
    error_page(t, Some(s), StatusCode::FORBIDDEN, t.forbidden)
}

/// Runs a page builder off the async threads (it reads the store) and answers its HTML.
async fn render_page<F>(t: &'static T, s: &Session, f: F) -> Response<Body>
where
    F: FnOnce() -> Result<String, pages::PageError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(body)) => html_response(StatusCode::OK, body),
        Ok(Err(pages::PageError::NotFound(what))) => error_page(
            t,
            Some(s),
            StatusCode::NOT_FOUND,
            &format!("{} {what}", t.not_found),
        ),
        Ok(Err(pages::PageError::BadRequest(what))) => {
            error_page(t, Some(s), StatusCode::BAD_REQUEST, &what)
        }
        // Raw windows retention dropped: gone, and the message says from when on they are kept.
        Ok(Err(pages::PageError::Store(crate::store::StoreError::Retained(what)))) => {
            error_page(t, Some(s), StatusCode::GONE, &what)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "console page failed");
            error_page(t, Some(s), StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Err(e) => error_page(
            t,
            Some(s),
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Login, logout, language, assets

#[derive(Debug, Deserialize, Default)]
struct NextQuery {
    #[serde(default)]
    next: String,
    #[serde(default)]
    refused: Option<u8>,
}

async fn login_page(
    State(c): State<St>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response<Body> {
    let t = T::of(lang_of(&headers));
    if session_of(&c, &headers).is_some() {
        return Redirect::to(local_path(&q.next)).into_response();
    }
    html_response(
        StatusCode::OK,
        pages::login(t, local_path(&q.next), q.refused.is_some()),
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(
    State(c): State<St>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<Peer>>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response<Body> {
    let t = T::of(lang_of(&headers));
    if !same_origin(&headers) {
        return error_page(t, None, StatusCode::FORBIDDEN, "cross-origin form refused");
    }
    if let Some(axum::Extension(axum::extract::ConnectInfo(Peer(peer)))) = peer
        && let Err(wait) = c.logins.attempt(peer.ip())
    {
        let secs = wait.as_secs().max(1);
        tracing::warn!(peer = %peer.ip(), retry_after_s = secs, "console login attempts over the limit; refused");
        let mut r = error_page(
            t,
            None,
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "too many login attempts from {}; try again in {secs} s",
                peer.ip()
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    // The interceptor's own check, on the token as a bearer header.
    let check = TokenCheck {
        store: c.store.clone(),
        need: Role::Auditor,
        service: "Console",
    };
    let mut md = tonic::metadata::MetadataMap::new();
    let caller = format!("Bearer {}", f.token.trim())
        .parse()
        .ok()
        .and_then(|v| {
            md.insert("authorization", v);
            check.check(&md).ok()
        });
    let Some(caller) = caller else {
        tracing::info!("console login refused");
        return Redirect::to(&format!(
            "/login?refused=1&next={}",
            html::url_part(local_path(&f.next))
        ))
        .into_response();
    };
    let now = (c.now)();
    match c.sessions.create(&caller, &token_hash(&f.token), now) {
        Ok(s) => {
            tracing::info!(name = %s.name, role = s.role.as_str(), "console login");
            let mut r = Redirect::to(local_path(&f.next)).into_response();
            if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&s, now)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => error_page(t, None, StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// The session of a POST that came from this console with the session's CSRF token.
fn check_post(c: &Console, headers: &HeaderMap, csrf: &str) -> Result<Session, Refusal> {
    let t = T::of(lang_of(headers));
    let s =
        session_of(c, headers).ok_or_else(|| Box::new(Redirect::to("/login").into_response()))?;
    if !same_origin(headers) || !session::same_secret(csrf, &s.csrf) {
        return Err(Box::new(error_page(
            t,
            Some(&s),
            StatusCode::FORBIDDEN,
            "form refused (origin or CSRF token)",
        )));
    }
    Ok(s)
}

async fn logout(
    State(c): State<St>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response<Body> {
    let s = match check_post(&c, &headers, &f.csrf) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    c.sessions.remove(&s.id);
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Debug, Deserialize, Default)]
struct BackQuery {
    #[serde(default)]
    back: String,
}

async fn set_lang(Path(lang): Path<String>, Query(q): Query<BackQuery>) -> Response<Body> {
    let lang = if lang == "en" { "en" } else { "ko" };
    let mut r = Redirect::to(local_path(&q.back)).into_response();
    let cookie = cookie::Cookie::build((LANG_COOKIE, lang))
        .secure(true)
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .path("/")
        .max_age(cookie::time::Duration::days(365))
        .build()
        .to_string();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn asset(Path(name): Path<String>) -> Response<Body> {
    match assets::get(&name) {
        Some((mime, bytes)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, mime),
                (header::CACHE_CONTROL, "private, max-age=3600"),
            ],
            bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

async fn not_found(State(c): State<St>, headers: HeaderMap) -> Response<Body> {
    let t = T::of(lang_of(&headers));
    let s = session_of(&c, &headers);
    error_page(t, s.as_ref(), StatusCode::NOT_FOUND, t.not_found)
}

// ---------------------------------------------------------------------------------------------
// Pages

/// Query-string parameters every list page takes (each page reads what it needs).
#[derive(Debug, Deserialize, Default, Clone)]
pub struct ListQuery {
    #[serde(default)]
    pub period: String,
    #[serde(default)]
    pub program: String,
    #[serde(default)]
    pub csp: String,
    #[serde(default)]
    pub grantee: String,
    #[serde(default)]
    pub grant: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub day: String,
    #[serde(default)]
    pub page: Option<usize>,
}

/// A period's figures (`period`, or this month), held or computed ([`data::ReportCache`]).
async fn figures(c: &Console, period: &str) -> Result<Arc<data::Report>, String> {
    let now = (c.now)();
    let period = data::period_or_month(period, now);
    c.reports.get(c.store.clone(), &period, now).await
}

/// What a page is built from besides its context.
type PageResult = Result<String, pages::PageError>;

/// Answers a page: the session (an admin's, with `admin`), then `build` off the async threads.
async fn page<F>(c: St, headers: &HeaderMap, path: String, admin: bool, build: F) -> Response<Body>
where
    F: FnOnce(&pages::Ctx<'_>, &Console) -> PageResult + Send + 'static,
{
    let s = match require(&c, headers, &path) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let t = T::of(lang_of(headers));
    if admin && !s.is_admin() {
        return forbidden(t, &s);
    }
    let s2 = s.clone();
    render_page(t, &s, move || {
        let ctx = pages::Ctx::new(t, &s2, c.store.as_ref(), &path, (c.now)());
        build(&ctx, &c)
    })
    .await
}

/// [`page`] for a page built from the period's figures (`q.period`, or this month).
async fn figures_page<F>(
    c: St,
    headers: &HeaderMap,
    path: String,
    q: ListQuery,
    admin: bool,
    build: F,
) -> Response<Body>
where
    F: FnOnce(&pages::Ctx<'_>, &data::Report, &Console, &ListQuery) -> PageResult + Send + 'static,
{
    let s = match require(&c, headers, &path) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let t = T::of(lang_of(headers));
    if admin && !s.is_admin() {
        return forbidden(t, &s);
    }
    let r = match figures(&c, &q.period).await {
        Ok(r) => r,
        Err(e) => return error_page(t, Some(&s), StatusCode::BAD_REQUEST, &e),
    };
    let s2 = s.clone();
    render_page(t, &s, move || {
        let ctx = pages::Ctx::new(t, &s2, c.store.as_ref(), &path, (c.now)());
        build(&ctx, &r, &c, &q)
    })
    .await
}

fn path_with_query(path: &str, raw: Option<&str>) -> String {
    match raw {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_string(),
    }
}

async fn fleet(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query("/", uri.query());
    figures_page(c, &headers, path, q, false, |ctx, r, c, q| {
        pages::fleet::page(ctx, r, &|a| c.is_connected(a), q)
    })
    .await
}

async fn grants(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query("/grants", uri.query());
    figures_page(c, &headers, path, q, false, |ctx, r, _, q| {
        pages::grants::list(ctx, r, q)
    })
    .await
}

async fn grant(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query(&format!("/grants/{}", html::url_part(&id)), uri.query());
    figures_page(c, &headers, path, q, false, move |ctx, r, _, q| {
        pages::grants::detail(ctx, r, &id, q)
    })
    .await
}

async fn grant_jobs(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query(
        &format!("/grants/{}/jobs", html::url_part(&id)),
        uri.query(),
    );
    page(c, &headers, path, false, move |ctx, _| {
        pages::grants::jobs(ctx, &id, &q)
    })
    .await
}

async fn card(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(uuid): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query(&format!("/cards/{}", html::url_part(&uuid)), uri.query());
    figures_page(c, &headers, path, q, false, move |ctx, r, c, q| {
        pages::card::page(ctx, r, &uuid, &|a| c.is_connected(a), q)
    })
    .await
}

async fn violations(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query("/violations", uri.query());
    figures_page(c, &headers, path, q, false, |ctx, r, _, q| {
        pages::lists::violations(ctx, r, q)
    })
    .await
}

async fn alarms(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query("/alarms", uri.query());
    page(c, &headers, path, false, move |ctx, _| {
        pages::lists::alarms(ctx, &q)
    })
    .await
}

async fn idle(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query("/idle", uri.query());
    figures_page(c, &headers, path, q, false, |ctx, r, _, q| {
        pages::lists::idle(ctx, r, q)
    })
    .await
}

async fn downloads(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    let path = path_with_query("/downloads", uri.query());
    figures_page(c, &headers, path, q, false, |ctx, r, _, _| {
        Ok(pages::ledger::downloads(ctx, r))
    })
    .await
}

#[derive(Debug, Deserialize, Default)]
struct DownloadQuery {
    #[serde(default)]
    period: String,
    #[serde(default)]
    format: String,
    #[serde(default)]
    lang: String,
}

async fn download(
    State(c): State<St>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<DownloadQuery>,
) -> Response<Body> {
    let path = path_with_query("/downloads/report", uri.query());
    let s = match require(&c, &headers, &path) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let t = T::of(lang_of(&headers));
    let r = match figures(&c, &q.period).await {
        Ok(r) => r,
        Err(e) => return error_page(t, Some(&s), StatusCode::BAD_REQUEST, &e),
    };
    let korean = q.lang != "en";
    match pages::ledger::report_file(&r, &q.format, korean) {
        Ok((name, mime, body)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, mime.to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{name}\""),
                ),
            ],
            body,
        )
            .into_response(),
        Err(e) => error_page(t, Some(&s), StatusCode::BAD_REQUEST, &e),
    }
}

async fn ledger(
    State(c): State<St>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    page(c, &headers, "/ledger".into(), false, move |ctx, c| {
        pages::ledger::ledger(ctx, &c.verification.state(), &q)
    })
    .await
}

async fn verify(
    State(c): State<St>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response<Body> {
    if let Err(r) = check_post(&c, &headers, &f.csrf) {
        return *r;
    }
    c.verification.start(c.store.clone(), c.now.clone());
    Redirect::to("/ledger").into_response()
}

async fn admin_tokens(State(c): State<St>, headers: HeaderMap) -> Response<Body> {
    page(c, &headers, "/admin/tokens".into(), true, |ctx, _| {
        pages::ledger::tokens(ctx)
    })
    .await
}

async fn admin_agents(
    State(c): State<St>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response<Body> {
    // An auditor is refused before the period's figures are read for it.
    figures_page(
        c,
        &headers,
        "/admin/agents".into(),
        q,
        true,
        |ctx, r, c, _| pages::ledger::agents(ctx, r, &|a| c.is_connected(a)),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Live

#[derive(Debug, Deserialize, Default)]
struct LiveQuery {
    /// `cards` (the default), `grants` or `hosts`: [`data::LiveView`].
    #[serde(default)]
    view: String,
    #[serde(default)]
    program: String,
    #[serde(default)]
    grant: String,
    #[serde(default)]
    host: String,
}

/// Server-Sent Events from the hub: each frame is one `fleet` event holding the cards and
/// grants that changed (all of them in a snapshot) in the compact form of
/// [`data::live_json`]. The stream ends with the session (logout, expiry, revocation) or the
/// hub.
async fn live(
    State(c): State<St>,
    headers: HeaderMap,
    Query(q): Query<LiveQuery>,
) -> Response<Body> {
    let Some(s) = session_of(&c, &headers) else {
        return (StatusCode::UNAUTHORIZED, "no session").into_response();
    };
    let Some(view) = data::LiveView::parse(&q.view) else {
        return (
            StatusCode::BAD_REQUEST,
            "view must be cards, grants or hosts",
        )
            .into_response();
    };
    let sub = c.hub().subscribe(crate::watch::Filter {
        program: q.program,
        grant_id: q.grant,
        host_id: q.host,
    });
    let hosts = data::LiveHosts::default();
    let stream = futures::stream::unfold(
        (sub, c.clone(), s.id, hosts),
        move |(mut sub, c, id, mut hosts)| async move {
            let frame = sub.next().await?;
            c.sessions.get(&id, (c.now)())?;
            let ev = Event::default()
                .event("fleet")
                .data(data::live_json_as(&frame, view, &mut hosts).to_string());
            Some((Ok::<_, std::convert::Infallible>(ev), (sub, c, id, hosts)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_nothing_from_elsewhere_and_nothing_inline() {
        assert!(CSP.starts_with("default-src 'none'"));
        for d in [
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'self'",
            "base-uri 'none'",
        ] {
            assert!(CSP.contains(d), "{d}");
        }
        assert!(!CSP.contains("unsafe"));
        assert!(!CSP.contains("http"));
        assert!(!CSP.contains('*'));
    }

    #[test]
    fn posts_must_come_from_the_console_itself() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7443"));
        assert!(!same_origin(&h), "no Origin: refused");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7443"),
        );
        assert!(!same_origin(&h), "plain http is not this console");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:7443"),
        );
        assert!(same_origin(&h));
    }

    #[test]
    fn redirects_stay_on_the_console() {
        assert_eq!(local_path("/grants?x=1"), "/grants?x=1");
        assert_eq!(local_path("//evil.example/"), "/");
        assert_eq!(local_path("/\\evil.example"), "/");
        assert_eq!(local_path("https://evil.example"), "/");
        assert_eq!(local_path(""), "/");
    }
}
