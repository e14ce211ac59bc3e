//! A local `nats-server` with JetStream for the scale-out tests: on loopback, on a port chosen
//! for it, with its store in a fresh directory; stopped by its PID (SIGTERM, then SIGKILL after a
//! bounded wait) and when dropped. The Debian package `nats-server` provides the binary (`.ci/run`
//! installs it); its absence fails the test with that hint rather than skipping it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use incident_stream::config::{BusKind, Config, NatsStorage};

pub struct NatsServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr").port()
}

impl NatsServer {
    /// Starts a JetStream-enabled server on a free loopback port.
    pub fn start() -> NatsServer {
        let mut s = NatsServer { port: free_port(), dir: super::fresh_dir(), child: None };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.join("store"))
            .arg("-l")
            .arg(self.dir.join("nats.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (Debian package `nats-server`; .ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + super::WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {} (see {:?})", self.port, self.dir);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGTERM by PID, SIGKILL if it lingers); its store stays.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, "-TERM", Duration::from_secs(5));
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A gateway configuration (TLS with dev certs, the test key) on this server's JetStream.
    pub fn gateway_config(&self) -> Config {
        let mut c = super::config();
        c.bus.kind = BusKind::Nats;
        c.bus.nats.url = self.url();
        c.bus.nats.storage = NatsStorage::File;
        c.bus.nats.request_timeout_ms = 2_000;
        c.bus.nats.max_reconnect_delay_ms = 300;
        c
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` to a child by its PID and waits up to `within` for it to end, then kills it.
fn stop_child(mut child: Child, signal: &str, within: Duration) {
    let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until `/ready` answers `want` (200 or 503).
pub async fn wait_ready(server: &super::TestServer, want: u16) {
    let deadline = Instant::now() + super::WAIT;
    loop {
        let r = server.http("GET", "/ready", &[], None).await;
        if r.status == want {
            return;
        }
        assert!(Instant::now() < deadline, "/ready stayed {} ({}), wanted {want}", r.status, r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy on loopback between one gateway and NATS, to cut that node off while the others
/// keep their link: `cut` closes every proxied connection and refuses new ones until `restore`.
pub struct Proxy {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = {
            let (open, links) = (open.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::Acquire) {
                        continue; // dropped: refused
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().expect("links").push(link);
                }
            })
        };
        Proxy { port, open, links, accept }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::Release);
        for l in self.links.lock().expect("links").drain(..) {
            l.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// A gateway node as its own process (the release or debug binary of this build), configured by
/// a TOML file written from `config`; stopped by its PID.
pub struct GatewayProcess {
    pub server: super::TestServer,
    child: Option<Child>,
}

impl GatewayProcess {
    pub fn spawn(config: &Config) -> GatewayProcess {
        use std::io::BufRead;
        let dir = super::fresh_dir();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, toml::to_string(config).expect("config as TOML")).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_incident-stream"))
            .args(["--config", path.to_str().expect("utf8"), "serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the gateway binary");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().expect("a line").expect("utf8");
        // The rest is drained, never closed: a closed pipe would make the gateway's next print fail.
        std::thread::spawn(move || lines.for_each(drop));
        let addr: std::net::SocketAddr = first
            .rsplit("://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        let ca = config.tls.enabled.then(|| config.tls.cert.with_file_name("ca.crt"));
        GatewayProcess { server: super::TestServer::at(addr, ca.as_deref()), child: Some(child) }
    }

    /// Sends `signal` (e.g. "-KILL") to the process by its PID and waits for it to end.
    pub fn stop(&mut self, signal: &str) {
        if let Some(child) = self.child.take() {
            stop_child(child, signal, super::WAIT);
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
