//! Headless Chromium driven over the Chrome DevTools Protocol (a WebSocket speaking JSON-RPC,
//! <https://chromedevtools.github.io/devtools-protocol/>): enough of it to open a page, evaluate
//! JavaScript in it and take a screenshot. The browser is Debian's `chromium` (installed by
//! `scripts/setup-browser.sh`, which `scripts/test.sh` runs).

#![allow(dead_code)]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// The browser binary: `$TESSERA_CHROMIUM`, else the first of `chromium`, `chromium-browser`
/// found on the PATH.
pub fn chromium() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TESSERA_CHROMIUM") {
        return Ok(p.into());
    }
    for name in ["chromium", "chromium-browser"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()?;
        if found.status.success() {
            return Ok(String::from_utf8_lossy(&found.stdout).trim().into());
        }
    }
    bail!("no chromium on the PATH: run scripts/setup-browser.sh (Debian's chromium package)")
}

/// A headless browser with one page, closed on drop.
pub struct Browser {
    child: Child,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts headless Chromium and attaches to its first page.
    pub fn launch() -> Result<Self> {
        let profile = tempfile::tempdir()?;
        let child = Command::new(chromium()?)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1400,1100",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromium")?;
        // Chromium writes the port it chose to DevToolsActivePort in the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u16>().ok()))
            {
                break port;
            }
            if Instant::now() > deadline {
                bail!("chromium did not open its DevTools port");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let targets: Value = ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
            .call()?
            .body_mut()
            .read_json()?;
        let page = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .context("no page target")?
            .to_owned();
        let (socket, _) = tungstenite::connect(page.as_str()).context("attaching to the page")?;
        let mut browser = Self {
            child,
            socket,
            next_id: 1,
            _profile: profile,
        };
        browser.call("Page.enable", json!({}))?;
        browser.call("Runtime.enable", json!({}))?;
        Ok(browser)
    }

    /// Calls a DevTools method and returns its result (events in between are skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.socket.send(Message::text(
            json!({"id": id, "method": method, "params": params}).to_string(),
        ))?;
        loop {
            let Message::Text(text) = self.socket.read()? else {
                continue;
            };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] == json!(id) {
                if !v["error"].is_null() {
                    bail!("{method}: {}", v["error"]);
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Loads `url`.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        self.call("Page.navigate", json!({"url": url}))?;
        Ok(())
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        )?;
        if !r["exceptionDetails"].is_null() {
            bail!("{expression}: {}", r["exceptionDetails"]);
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `expression` is true in the page.
    pub fn wait_for(&mut self, what: &str, expression: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(expression).ok() == Some(json!(true)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let body = self
                    .eval("document.body ? document.body.innerText.slice(0, 2000) : ''")
                    .unwrap_or_default();
                bail!("timed out waiting for {what}; the page shows:\n{body}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG screenshot of the page.
    pub fn screenshot(&mut self) -> Result<Vec<u8>> {
        use base64::Engine as _;
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )?;
        let data = r["data"].as_str().context("screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}
