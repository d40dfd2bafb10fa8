//! A small W3C WebDriver client for integration tests that drive headless Chromium through
//! chromedriver.
//!
//! Only std and serde_json/base64 are used: each command is one plain HTTP/1.1 request to
//! chromedriver on 127.0.0.1 (`Connection: close`, one request per connection). Every
//! failure, including a WebDriver error (`{"value":{"error":..,"message":..}}`), comes back
//! as `Err(String)`; nothing in here panics.
//!
//! ```ignore
//! let driver = Driver::start()?;
//! let s = driver.session()?;
//! s.goto("http://127.0.0.1:8080/review")?;
//! s.send_keys(&s.find("input[name=ip]")?, "192.0.2.1")?;
//! s.click(&s.find("button[type=submit]")?)?;
//! let verdict = s.wait_for("#verdict", Duration::from_secs(5))?;
//! assert_eq!(s.text(&verdict)?, "allow");
//! ```
//!
//! Lifetimes: a `Session` keeps the chromedriver process alive (shared ownership), so the
//! order in which a test drops its `Driver` and `Session`s does not matter. The process is
//! shut down (gracefully via `/shutdown`, which also closes any browser left open, then
//! killed) once the `Driver` and all its sessions are gone.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

/// Environment variable naming the chromedriver binary (default: `chromedriver` on PATH).
pub const CHROMEDRIVER_ENV: &str = "REGIONGUARD_CHROMEDRIVER";
/// Environment variable naming the Chromium binary (default: `/usr/bin/chromium` if present,
/// else whatever chromedriver finds on its own).
pub const CHROMIUM_ENV: &str = "REGIONGUARD_CHROMIUM";

/// The key under which W3C WebDriver serialises an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long `Driver::start` waits for `/status` to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Socket read/write timeout for one command. Generous: navigation blocks until page load.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between polls in `Driver::start` and `Session::wait_for`.
const POLL: Duration = Duration::from_millis(100);

/// Unique suffixes for temp dirs within this process.
static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A running chromedriver on a loopback port.
pub struct Driver {
    inner: Arc<Process>,
}

/// The chromedriver child process, owned jointly by the `Driver` and its sessions.
struct Process {
    child: Child,
    port: u16,
    /// Holds chromedriver's output log and the sessions' browser profiles; removed on drop.
    dir: PathBuf,
}

/// One browser session (one headless Chromium with its own profile).
pub struct Session {
    inner: Arc<Process>,
    id: String,
    profile: PathBuf,
}

/// A reference to an element in a session's current page (the WebDriver element id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element(String);

impl Element {
    /// The WebDriver element reference id.
    pub fn id(&self) -> &str {
        &self.0
    }

    /// The element as a JSON value, for passing to `Session::execute` as an argument
    /// (the script sees the DOM element).
    pub fn to_json(&self) -> Value {
        json!({ ELEMENT_KEY: self.0 })
    }
}

impl Driver {
    /// Starts chromedriver on a free loopback port and waits (up to ~15 s) until `GET /status`
    /// says it is ready. The binary is `$REGIONGUARD_CHROMEDRIVER`, else `chromedriver` on PATH.
    pub fn start() -> Result<Driver, String> {
        let binary = std::env::var(CHROMEDRIVER_ENV).unwrap_or_else(|_| "chromedriver".into());
        let dir = unique_temp_dir("regionguard-webdriver")?;
        // Picking a port by binding :0 and releasing it is racy; if chromedriver dies right away
        // (e.g. someone else took the port), try again with another one.
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            match spawn(&binary, port, &dir) {
                Ok(process) => {
                    return Ok(Driver {
                        inner: Arc::new(process),
                    });
                }
                Err(e) => last_err = e,
            }
        }
        let _ = fs::remove_dir_all(&dir);
        Err(last_err)
    }

    /// The loopback port chromedriver listens on.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// A new headless Chromium session with a fresh profile (removed when the session drops).
    pub fn session(&self) -> Result<Session, String> {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let profile = self.inner.dir.join(format!("profile-{n}"));
        fs::create_dir_all(&profile)
            .map_err(|e| format!("cannot create {}: {e}", profile.display()))?;

        let mut options = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        });
        if let Some(binary) = chromium_binary() {
            options["binary"] = json!(binary);
        }
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": options,
                },
            },
        });

        let value = match request(self.inner.port, "POST", "/session", Some(&caps)) {
            Ok(value) => value,
            Err(e) => {
                let _ = fs::remove_dir_all(&profile);
                return Err(format!("new session: {e}"));
            }
        };
        let id = value["sessionId"]
            .as_str()
            .ok_or_else(|| format!("new session: no sessionId in {value}"))?
            .to_owned();
        Ok(Session {
            inner: Arc::clone(&self.inner),
            id,
            profile,
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // `/shutdown` makes chromedriver quit every browser it still has open and exit; a bare
        // kill could leave orphaned Chromium processes behind.
        let _ = request(self.port, "GET", "/shutdown", None);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Session {
    /// The WebDriver session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Navigates to `url` and waits for the page to load.
    pub fn goto(&self, url: &str) -> Result<(), String> {
        self.post("/url", json!({ "url": url }))
            .map(drop)
            .map_err(|e| format!("goto {}: {e}", abbreviate(url)))
    }

    pub fn current_url(&self) -> Result<String, String> {
        string(self.get("/url")?)
    }

    pub fn title(&self) -> Result<String, String> {
        string(self.get("/title")?)
    }

    /// The page source as serialised from the current DOM.
    pub fn source(&self) -> Result<String, String> {
        string(self.get("/source")?)
    }

    /// The first element matching the CSS selector `css`.
    pub fn find(&self, css: &str) -> Result<Element, String> {
        self.post("/element", by_css(css))
            .and_then(element)
            .map_err(|e| format!("find {css:?}: {e}"))
    }

    /// Every element matching `css` (possibly none: that is not an error).
    pub fn find_all(&self, css: &str) -> Result<Vec<Element>, String> {
        self.post("/elements", by_css(css))
            .and_then(elements)
            .map_err(|e| format!("find_all {css:?}: {e}"))
    }

    /// The first descendant of `parent` matching `css`.
    pub fn find_in(&self, parent: &Element, css: &str) -> Result<Element, String> {
        self.post(&format!("/element/{}/element", parent.0), by_css(css))
            .and_then(element)
            .map_err(|e| format!("find {css:?} in element {}: {e}", parent.0))
    }

    /// Every descendant of `parent` matching `css`.
    pub fn find_all_in(&self, parent: &Element, css: &str) -> Result<Vec<Element>, String> {
        self.post(&format!("/element/{}/elements", parent.0), by_css(css))
            .and_then(elements)
            .map_err(|e| format!("find_all {css:?} in element {}: {e}", parent.0))
    }

    /// Clicks the element (scrolling it into view first). Clicking an `<option>` selects it in
    /// Chrome and fires `input`/`change` on its `<select>`; see `select`.
    pub fn click(&self, el: &Element) -> Result<(), String> {
        self.post(&format!("/element/{}/click", el.0), json!({}))
            .map(drop)
    }

    /// Empties an editable element (`<input>`, `<textarea>`, contenteditable).
    pub fn clear(&self, el: &Element) -> Result<(), String> {
        self.post(&format!("/element/{}/clear", el.0), json!({}))
            .map(drop)
    }

    /// Types `text` into the element (appending to what it holds; `clear` first to replace).
    pub fn send_keys(&self, el: &Element, text: &str) -> Result<(), String> {
        self.post(&format!("/element/{}/value", el.0), json!({ "text": text }))
            .map(drop)
    }

    /// Selects the `<option value="...">` inside the `<select>` element by clicking it.
    pub fn select(&self, select: &Element, value: &str) -> Result<(), String> {
        let css = format!("option[value=\"{}\"]", css_string(value));
        let option = self.find_in(select, &css)?;
        self.click(&option)
    }

    /// The element's rendered (visible) text.
    pub fn text(&self, el: &Element) -> Result<String, String> {
        string(self.get(&format!("/element/{}/text", el.0))?)
    }

    /// The element's content attribute `name`, or `None` if it has none. This is the markup's
    /// value: `attribute(input, "value")` stays the initial value after typing, so use
    /// `property(el, "value")` for what the user entered.
    pub fn attribute(&self, el: &Element, name: &str) -> Result<Option<String>, String> {
        let path = format!("/element/{}/attribute/{}", el.0, path_segment(name));
        match self.get(&path)? {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            other => Ok(Some(other.to_string())),
        }
    }

    /// The element's DOM property `name` (e.g. `value` of an input after typing), as JSON.
    pub fn property(&self, el: &Element, name: &str) -> Result<Value, String> {
        self.get(&format!(
            "/element/{}/property/{}",
            el.0,
            path_segment(name)
        ))
    }

    /// Runs `script` as the body of a function with `args` as `arguments` and returns what it
    /// returns. Pass elements with `Element::to_json`.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value, String> {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
    }

    /// A PNG screenshot of the viewport.
    pub fn screenshot_png(&self) -> Result<Vec<u8>, String> {
        let encoded = string(self.get("/screenshot")?)?;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map_err(|e| format!("screenshot: bad base64: {e}"))
    }

    /// Polls `find(css)` until it succeeds or `timeout` passes (e.g. after a form submit).
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Result<Element, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.find(css) {
                Ok(el) => return Ok(el),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("timed out after {timeout:?}: {e}"));
                }
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    fn get(&self, path: &str) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.id);
        request(self.inner.port, "GET", &path, None)
    }

    fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.id);
        request(self.inner.port, "POST", &path, Some(&body))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closes the browser; chromedriver waits for it to exit, so the profile is free after.
        let path = format!("/session/{}", self.id);
        let _ = request(self.inner.port, "DELETE", &path, None);
        let _ = fs::remove_dir_all(&self.profile);
    }
}

/// A `data:` URL showing `html`, for tests that need a page without a server.
pub fn data_url(html: &str) -> String {
    let mut url = String::from("data:text/html;charset=utf-8,");
    for b in html.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~!*'()=/:;,".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

// ---------------------------------------------------------------------------------------------
// Process start-up.

fn spawn(binary: &str, port: u16, dir: &Path) -> Result<Process, String> {
    let log_path = dir.join(format!("chromedriver-{port}.log"));
    let log = File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot dup {}: {e}", log_path.display()))?;
    let mut child = Command::new(binary)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot run {binary:?} (set {CHROMEDRIVER_ENV}): {e}"))?;

    let deadline = Instant::now() + START_TIMEOUT;
    let failure = loop {
        if let Ok(status) = request(port, "GET", "/status", None)
            && status["ready"].as_bool() == Some(true)
        {
            return Ok(Process {
                child,
                port,
                dir: dir.to_owned(),
            });
        }
        if let Ok(Some(exit)) = child.try_wait() {
            break format!("exited ({exit}) before ready");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break format!("not ready after {START_TIMEOUT:?}");
        }
        thread::sleep(POLL);
    };
    // The temp dir stays for the caller's next attempt; only this attempt's log goes.
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let _ = fs::remove_file(&log_path);
    Err(format!("{binary} --port={port} {failure}: {}", log.trim()))
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot pick a free port: {e}"))
}

fn unique_temp_dir(prefix: &str) -> Result<PathBuf, String> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}-{n}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn chromium_binary() -> Option<String> {
    if let Ok(binary) = std::env::var(CHROMIUM_ENV) {
        return Some(binary);
    }
    let default = "/usr/bin/chromium";
    Path::new(default).exists().then(|| default.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Protocol helpers.

fn by_css(css: &str) -> Value {
    json!({ "using": "css selector", "value": css })
}

fn element(value: Value) -> Result<Element, String> {
    value[ELEMENT_KEY]
        .as_str()
        .map(|id| Element(id.to_owned()))
        .ok_or_else(|| format!("not an element reference: {value}"))
}

fn elements(value: Value) -> Result<Vec<Element>, String> {
    match value {
        Value::Array(items) => items.into_iter().map(element).collect(),
        other => Err(format!("not a list of elements: {other}")),
    }
}

fn string(value: Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(format!("expected a string, got {other}")),
    }
}

/// `s` cut to at most 120 characters, for error messages (a `data:` URL can be a whole page).
fn abbreviate(s: &str) -> String {
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// Escapes `s` for use inside a double-quoted CSS string.
fn css_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\a "),
            _ => out.push(c),
        }
    }
    out
}

/// Percent-encodes `s` for use as one URL path segment.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 over a fresh loopback connection per command.

/// Sends one command and returns the response's `value`, or the WebDriver error as its
/// message (prefixed with the error code unless the message already starts with it).
fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let (status, body) =
        http(port, method, path, body).map_err(|e| format!("{method} {path}: {e}"))?;
    let json: Value = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "{method} {path}: HTTP {status}, body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    })?;
    let value = match json {
        Value::Object(mut map) => map.remove("value").unwrap_or(Value::Null),
        other => other,
    };
    if let Some(error) = value.get("error").and_then(Value::as_str) {
        let message = value.get("message").and_then(Value::as_str).unwrap_or("");
        // chromedriver's messages usually repeat the error code already.
        return Err(if message.starts_with(error) {
            message.to_owned()
        } else {
            format!("{error}: {message}")
        });
    }
    if !(200..300).contains(&status) {
        return Err(format!("{method} {path}: HTTP {status}: {value}"));
    }
    Ok(value)
}

/// One HTTP exchange: returns the status code and the (de-chunked) body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Vec<u8>), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;

    let payload = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if body.is_some() {
        req.push_str("Content-Type: application/json; charset=utf-8\r\n");
    }
    // Always send a length: chromedriver wants one on POST, and it is harmless elsewhere.
    req.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    req.push_str(&payload);
    stream
        .write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;

    // Read only as far as the framing says: chromedriver answers `Connection: close` but
    // leaves the socket open, so reading to EOF would hang until the read timeout.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        let eof = n == 0;
        raw.extend_from_slice(&buf[..n]);
        if let Some(response) = parse_response(&raw, eof)? {
            return Ok(response);
        }
        if eof {
            return Err(format!(
                "connection closed mid-response: {}",
                String::from_utf8_lossy(&raw)
            ));
        }
    }
}

/// Parses a response read so far: `Ok(None)` if more bytes are needed. `eof` says the peer
/// closed the connection, which ends a body that has neither a length nor chunking.
fn parse_response(raw: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
    let Some(head_end) = find(raw, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "non-UTF-8 HTTP headers")?;
    let rest = &raw[head_end + 4..];

    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad HTTP status line {status_line:?}"))?;

    // chromedriver writes headers without a space after the colon (`Content-Length:252`).
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }

    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = content_length {
        rest.get(..len).map(<[u8]>::to_vec)
    } else {
        eof.then(|| rest.to_vec())
    };
    Ok(body.map(|body| (status, body)))
}

/// Decodes a chunked body: `Ok(None)` if it is not complete yet.
fn dechunk(mut data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&data[..line_end]).map_err(|_| "bad chunk size line")?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers, if any, are ignored; the last chunk is enough to finish.
            return Ok(Some(body));
        }
        let Some(chunk) = data.get(..size) else {
            return Ok(None);
        };
        body.extend_from_slice(chunk);
        let Some(after) = data.get(size + 2..) else {
            return Ok(None);
        };
        data = after;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
