//! The live view's HTTP server (axum on a thread and runtime of its own, here because this crate
//! is the only one that knows tokio): a page (its HTML, script and styles given by the caller,
//! embedded in the binary), `/api/state` (the whole state as JSON), `/api/events` (server-sent
//! events: the state, then after each change, at most 4 a second, what the client does not hold
//! yet), `/metrics` (Prometheus text). GET only; anything else is a 4xx from axum or hyper (a
//! malformed or oversized request included), and the run goes on. What it serves comes from a
//! `Dashboard` (lowband-view's state, through the CLI).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures_util::stream::Stream;

use crate::NetError;

/// What the server serves: the caller's state, read on the server's thread.
pub trait Dashboard: Send + Sync + 'static {
    /// Bumped by every change (what pushes follow).
    fn version(&self) -> u64;
    /// The state as JSON; `cursors` is what this client already holds (empty: nothing), advanced
    /// to what it holds after this.
    fn state_json(&self, cursors: &mut Vec<(usize, usize)>) -> String;
    /// The state in the Prometheus text format.
    fn metrics_text(&self) -> String;
}

/// The page: its HTML (`/`), script (`/app.js`) and styles (`/app.css`).
#[derive(Clone, Copy, Debug)]
pub struct Page {
    pub index_html: &'static str,
    pub app_js: &'static str,
    pub app_css: &'static str,
}

#[derive(Clone)]
struct Served {
    source: Arc<dyn Dashboard>,
    page: Page,
}

/// Pushes are at most this often (a run records thousands of events a second).
const PUSH_EVERY: Duration = Duration::from_millis(250);

/// A running server; dropping it stops it.
pub struct HttpServer {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Where it listens (a port 0 made real).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serve until the process ends (`lowband view`).
    pub fn serve_forever(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serve `source` and `page` on `listen` (bound before this returns, so that a taken port is an
/// error here).
pub fn serve_http(
    source: Arc<dyn Dashboard>,
    page: Page,
    listen: SocketAddr,
) -> Result<HttpServer, NetError> {
    let failed = |source: std::io::Error| NetError::Bind {
        address: listen,
        source,
    };
    let listener = std::net::TcpListener::bind(listen).map_err(failed)?;
    listener.set_nonblocking(true).map_err(failed)?;
    let address = listener.local_addr().map_err(failed)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(failed)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
        .route("/api/state", get(api_state))
        .route("/api/events", get(api_events))
        .route("/metrics", get(metrics))
        .with_state(Served { source, page });
    let thread = std::thread::Builder::new()
        .name("lowband-dashboard".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::warn!("dashboard: {e}");
                        return;
                    }
                };
                tokio::select! {
                    served = axum::serve(listener, app) => {
                        if let Err(e) = served {
                            tracing::warn!("dashboard: {e}");
                        }
                    }
                    _ = stopped => {}
                }
            });
            // (The runtime drops here: open event streams end with it.)
        })
        .map_err(failed)?;
    Ok(HttpServer {
        address,
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn no_store(content_type: &'static str, body: impl IntoResponse) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

async fn index(State(served): State<Served>) -> impl IntoResponse {
    no_store("text/html; charset=utf-8", served.page.index_html)
}

async fn app_js(State(served): State<Served>) -> impl IntoResponse {
    no_store("text/javascript; charset=utf-8", served.page.app_js)
}

async fn app_css(State(served): State<Served>) -> impl IntoResponse {
    no_store("text/css; charset=utf-8", served.page.app_css)
}

async fn api_state(State(served): State<Served>) -> impl IntoResponse {
    no_store(
        "application/json",
        served.source.state_json(&mut Vec::new()),
    )
}

async fn metrics(State(served): State<Served>) -> impl IntoResponse {
    no_store(
        "text/plain; version=0.0.4; charset=utf-8",
        served.source.metrics_text(),
    )
}

/// The state at once, then after every change (checked every `PUSH_EVERY`), each time with only
/// what this client does not hold yet.
async fn api_events(
    State(served): State<Served>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures_util::stream::unfold(
        (served.source, None::<u64>, Vec::new()),
        |(source, mut seen, mut cursors)| async move {
            loop {
                let version = source.version();
                if seen != Some(version) {
                    seen = Some(version);
                    break;
                }
                tokio::time::sleep(PUSH_EVERY).await;
            }
            let data = source.state_json(&mut cursors);
            let event = Event::default().event("state").data(data);
            Some((Ok(event), (source, seen, cursors)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
