//! `burrow demo`: an edge, an agent and the sample chat app on this machine,
//! wired together exactly as on a VPS and a NAS, with a self-signed
//! certificate. Prints where to point a browser, runs until Ctrl-C.

pub mod app;

use std::net::SocketAddr;
use std::process::ExitCode;

use burrow_agent::{Agent, AgentConfig, AgentStatus};
use burrow_edge::{Edge, EdgeConfig};
use burrow_proto::confkit::Source;
use burrow_proto::identity::Identity;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// Runs the demo until `shutdown`. `port` 0 picks a free port; a taken
/// port falls back to a free one too.
pub async fn run(port: u16, shutdown: CancellationToken) -> ExitCode {
    match run_inner(port, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "demo failed");
            ExitCode::FAILURE
        }
    }
}

async fn https_addr(port: u16) -> SocketAddr {
    let wanted = SocketAddr::from(([127, 0, 0, 1], port));
    match TcpListener::bind(wanted).await {
        // Free now; the edge binds it again right after.
        Ok(_) => wanted,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

async fn run_inner(
    port: u16,
    shutdown: CancellationToken,
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile_dir()?;
    let app_listener = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app_listener.local_addr()?;
    tokio::spawn(app::serve(app_listener, shutdown.clone()));

    // A fresh password per run, shown once below.
    let password: String = {
        use rand::Rng;
        const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        let mut rng = rand::rng();
        (0..16)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect()
    };
    let hash =
        burrow_edge::access::auth::hash_password(password.as_bytes()).map_err(|e| e.to_string())?;
    let agent_key = dir.join("agent.key");
    let agent_fp = Identity::create(&agent_key)?.fingerprint();
    let edge_toml = format!(
        r#"[edge]
state_dir = {state:?}
https = "{https}"
tunnel = "127.0.0.1:0"

[tls]
mode = "self-signed"

[[agent]]
name = "home"
key = "{agent_fp}"

[[user]]
name = "demo"
password = "{hash}"

[[route]]
host = "localhost"
agent = "home"
service = "chat"
auth = "basic"
users = ["demo"]
public_paths = ["/manifest.json"]

[[route]]
host = "127.0.0.1"
agent = "home"
service = "chat"
auth = "basic"
users = ["demo"]
public_paths = ["/manifest.json"]
"#,
        state = dir.join("edge"),
        https = https_addr(port).await,
    );
    let edge = Edge::bind(EdgeConfig::from_source(&Source::new(
        "demo edge.toml",
        edge_toml,
    ))?)
    .await?;
    let https = edge
        .https_addr()
        .ok_or("the demo edge has no https listener")?;
    let agent_toml = format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n\n[[service]]\nname = \"chat\"\nurl = \"http://{app_addr}\"\nhealth = \"/health\"\n",
        edge.tunnel_addr(),
        edge.fingerprint(),
        agent_key,
    );
    let agent = Agent::new(AgentConfig::from_source(&Source::new(
        "demo agent.toml",
        agent_toml,
    ))?)?;
    let mut status = agent.status();

    let edge_task = tokio::spawn(edge.run(shutdown.clone()));
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    tokio::select! {
        r = status.wait_for(|s| matches!(s, AgentStatus::Connected { .. })) => { r?; }
        () = shutdown.cancelled() => {}
    }
    if !shutdown.is_cancelled() {
        let url = format!("https://localhost:{}/", https.port());
        println!("burrow demo is running: edge, agent and a sample chat app on this machine.\n");
        println!("  open     {url}");
        println!("           (self-signed certificate: accept the browser's warning)");
        println!("  user     demo");
        println!("  password {password}");
        println!("  SSE      curl -kN -u demo:{password} {url}sse");
        println!(
            "  Ollama   curl -kN -u demo:{password} {url}api/chat -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
        );
        println!(
            "  direct   http://{app_addr}/  (the sample app without the tunnel, for comparison)"
        );
        println!("\nCtrl-C to stop.");
    }
    shutdown.cancelled().await;
    edge_task.await??;
    agent_task.await??;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("burrow-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
