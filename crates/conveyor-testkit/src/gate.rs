//! A TCP gate between a client and a server: a test closes it to make the server unreachable
//! (open connections cut, new ones refused, as when a database goes down) and opens it again,
//! on the same port.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpGate {
    port: u16,
    open: Arc<watch::Sender<bool>>,
}

impl TcpGate {
    /// Forwards 127.0.0.1:`port` (a free one) to `target`, open.
    pub async fn start(target: SocketAddr) -> TcpGate {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let port = listener.local_addr().expect("gate address").port();
        let open = Arc::new(watch::channel(true).0);
        tokio::spawn(run(listener, port, target, Arc::clone(&open)));
        TcpGate { port, open }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts every connection through the gate and refuses new ones; returns once a new
    /// connection is refused.
    pub async fn close(&self) {
        self.open.send_replace(false);
        self.until_reachable(false).await;
    }

    /// Lets connections through again; returns once the port accepts them.
    pub async fn open(&self) {
        self.open.send_replace(true);
        self.until_reachable(true).await;
    }

    async fn until_reachable(&self, reachable: bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() != reachable {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gate on port {} did not turn {}",
                self.port,
                if reachable { "open" } else { "closed" }
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.open.send_replace(false);
    }
}

async fn run(listener: TcpListener, port: u16, target: SocketAddr, open: Arc<watch::Sender<bool>>) {
    let mut state = open.subscribe();
    let mut listener = Some(listener);
    loop {
        match &listener {
            Some(accepting) => tokio::select! {
                accepted = accepting.accept() => {
                    if let Ok((client, _)) = accepted {
                        tokio::spawn(forward(client, target, open.subscribe()));
                    }
                }
                changed = state.changed() => {
                    if changed.is_err() { return; }
                    if !*state.borrow() { listener = None; }
                }
            },
            None => {
                if state.changed().await.is_err() {
                    return;
                }
                if *state.borrow() {
                    listener = TcpListener::bind(("127.0.0.1", port)).await.ok();
                }
            }
        }
    }
}

/// Copies both ways until either side ends or the gate closes.
async fn forward(mut client: TcpStream, target: SocketAddr, mut state: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = state.wait_for(|open| !*open) => {}
    }
}
