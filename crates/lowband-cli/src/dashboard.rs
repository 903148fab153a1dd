//! The live view from the command line: every run records its events (`runs/NAME/events.jsonl`,
//! what `lowband view` serves again), and `--dashboard ADDR` serves them while the run goes
//! (`lowband_view`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lowband_net::http::{serve_http, Dashboard, HttpServer, Page};
use lowband_runtime::{Observer, RunEvent, RunResult};
use lowband_view::Live;

/// lowband-view's state, as the network crate's HTTP server reads it.
struct LiveDashboard(Arc<Live>);

impl Dashboard for LiveDashboard {
    fn version(&self) -> u64 {
        self.0.version()
    }
    fn state_json(&self, cursors: &mut Vec<(usize, usize)>) -> String {
        self.0.to_json(cursors)
    }
    fn metrics_text(&self) -> String {
        self.0.prometheus()
    }
}

/// Serve `live`'s page, state and metrics on `listen`.
fn serve(live: Arc<Live>, listen: SocketAddr) -> Result<HttpServer> {
    let (index_html, app_js, app_css) = lowband_view::PAGE;
    let page = Page {
        index_html,
        app_js,
        app_css,
    };
    Ok(serve_http(Arc::new(LiveDashboard(live)), page, listen)?)
}

/// `--dashboard` / `--listen`: `PORT` (loopback), or `HOST:PORT` as given (`0.0.0.0:8080` to
/// let other machines see it).
pub fn parse_listen(text: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut all| all.next())
        .ok_or_else(|| format!("`{text}` is neither a port nor HOST:PORT"))
}

/// A run's live view: recorded always, served when asked.
pub struct Watch {
    live: Arc<Live>,
    dashboard: Option<HttpServer>,
}

impl Watch {
    /// The view of run `name` that will run `planned` strategies; served on `listen` if given
    /// (its address printed).
    pub fn start(name: &str, planned: Vec<String>, listen: Option<SocketAddr>) -> Result<Watch> {
        let live = Live::new(name, planned);
        let dashboard = match listen {
            Some(address) => {
                let dashboard = serve(live.clone(), address)?;
                println!("dashboard: http://{}/", dashboard.address());
                Some(dashboard)
            }
            None => None,
        };
        Ok(Watch { live, dashboard })
    }

    pub fn observer(&self) -> Observer {
        self.live.observer()
    }

    /// A strategy's run ended.
    pub fn finished(&self, result: &RunResult) {
        self.live.record(RunEvent::Finished {
            strategy: result.strategy.name(),
            rounds: result.rounds,
            final_val_loss: result
                .final_val_loss
                .is_finite()
                .then_some(result.final_val_loss),
        });
    }

    /// The run is over: the page says so, and its events go to `run_dir/events.jsonl`.
    pub fn finish(self, run_dir: &Path) -> Result<()> {
        self.live.finish();
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        lowband_engine::checkpoint::write_atomic(
            &run_dir.join("events.jsonl"),
            &self.live.events_jsonl(),
        )?;
        if self.dashboard.is_some() {
            // (Pushes go out at most every 250 ms: let the last one, "finished", reach the page.)
            std::thread::sleep(std::time::Duration::from_millis(400));
            println!(
                "dashboard: the run is over; `lowband view {}` shows it again",
                run_dir.display()
            );
        }
        Ok(())
    }
}

#[derive(clap::Args, Debug)]
pub struct ViewArgs {
    /// A run directory (runs/NAME) with its events.jsonl.
    pub run_dir: PathBuf,
    /// Where to serve the page: PORT (loopback) or HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub listen: SocketAddr,
}

/// `lowband view runs/NAME`: a finished run's page, until Ctrl-C.
pub fn view(args: &ViewArgs) -> Result<()> {
    let events = args.run_dir.join("events.jsonl");
    if !events.exists() {
        bail!("{}: no such file (runs record their events since this version of lowband; run it again)", events.display());
    }
    let name = args.run_dir.file_name().map_or_else(
        || args.run_dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let live = Live::replay(&name, &events)?;
    let dashboard = serve(live, args.listen)?;
    println!("view: http://{}/ (Ctrl-C to stop)", dashboard.address());
    dashboard.serve_forever();
    Ok(())
}
