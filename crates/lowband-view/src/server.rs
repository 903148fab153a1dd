//! The dashboard's HTTP server (axum on a thread and runtime of its own): the page (embedded
//! HTML, script and styles: no CDN, nothing to build), `/api/state` (the whole state as JSON),
//! `/api/events` (server-sent events: the state, then each change, at most 4 a second, with only
//! the curve points the client does not have), `/metrics` (Prometheus). GET only; anything else
//! is a 4xx from axum or hyper (a malformed or oversized request included), and the run goes on.

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

use crate::{Live, ViewError};

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// Pushes are at most this often (a run records thousands of events a second).
const PUSH_EVERY: Duration = Duration::from_millis(250);

/// A running dashboard; dropping it stops the server.
pub struct Dashboard {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dashboard {
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

impl Drop for Dashboard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serve `live` on `listen` (bound before this returns, so that a taken port is an error here).
pub fn serve(live: Arc<Live>, listen: SocketAddr) -> Result<Dashboard, ViewError> {
    let failed = |e: std::io::Error| ViewError::Listen {
        address: listen.to_string(),
        detail: e.to_string(),
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
        .with_state(live);
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
    Ok(Dashboard {
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

async fn index() -> impl IntoResponse {
    no_store("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> impl IntoResponse {
    no_store("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> impl IntoResponse {
    no_store("text/css; charset=utf-8", APP_CSS)
}

async fn api_state(State(live): State<Arc<Live>>) -> impl IntoResponse {
    no_store("application/json", live.to_json(&mut Vec::new()))
}

async fn metrics(State(live): State<Arc<Live>>) -> impl IntoResponse {
    no_store(
        "text/plain; version=0.0.4; charset=utf-8",
        live.prometheus(),
    )
}

/// The state at once, then after every change (at most every `PUSH_EVERY`), each time with only
/// the curve points this client does not hold yet.
async fn api_events(
    State(live): State<Arc<Live>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = live.subscribe();
    let stream = futures_util::stream::unfold(
        (live, changes, Vec::new(), true),
        |(live, mut changes, mut cursors, first)| async move {
            if !first {
                changes.changed().await.ok()?;
                tokio::time::sleep(PUSH_EVERY).await;
                changes.borrow_and_update();
            }
            let data = live.to_json(&mut cursors);
            let event = Event::default().event("state").data(data);
            Some((Ok(event), (live, changes, cursors, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
