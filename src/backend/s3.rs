//! A repository in an S3-compatible object store (AWS S3, Garage, Ceph
//! RGW, MinIO, ...): one object per file under `PREFIX/` in a bucket that
//! exists beforehand. Requests are signed with SigV4 (`rusty-s3`, query
//! signing) and sent by a blocking HTTP client (`ureq`) with a connection
//! pool, so scanner threads upload packs in parallel with no async
//! runtime.
//!
//! Where the store is and who we are comes from the environment, as the
//! AWS tools read it: `AWS_ENDPOINT_URL` (path-style requests; without it
//! AWS itself, virtual-host style), `AWS_REGION` / `AWS_DEFAULT_REGION`,
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, or
//! the profile `AWS_PROFILE` (default `default`) of
//! `~/.aws/credentials` and `~/.aws/config` (`region`, `endpoint_url`).
//!
//! Every HTTP answer is classified: 404 is "absent" only for `NoSuchKey`
//! (a missing bucket is a permanent error that says so), 401/403 are
//! denials, 408/429/5xx and transport failures are transient (retried by
//! [`super::retry::Retrying`]). Create-if-absent sends `If-None-Match: *`
//! but is never trusted to be atomic: Garage accepts it and overwrites.

use super::{Backend, Created, Entry, Error, ErrorKind, Result, check_name};
use rusty_s3::actions::{DeleteObject, GetObject, ListObjectsV2, PutObject, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// How long a signed request stays valid.
const SIGN_FOR: Duration = Duration::from_secs(15 * 60);
/// Largest object laybak reads whole (a layer manifest is bounded at 1 GiB).
const MAX_GET: u64 = 2 << 30;

/// Where an S3 repository lives and how to reach it.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `https://host[:port]` of the store.
    pub endpoint: url::Url,
    /// Path-style (`endpoint/bucket/key`) or virtual-host requests.
    pub path_style: bool,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix of the repository (no leading or trailing `/`).
    pub prefix: String,
    /// Region the requests are signed for.
    pub region: String,
    /// Access key id.
    pub key: String,
    /// Secret access key.
    pub secret: String,
    /// Session token, if any.
    pub token: Option<String>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Permanent, msg)
}

/// `[section]` → key → value of an AWS-style INI file.
fn ini(path: &std::path::Path) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return out;
    };
    let mut cur = String::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('#') || l.starts_with(';') || l.is_empty() {
            continue;
        }
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            cur = s.trim().to_string();
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            out.entry(cur.clone())
                .or_default()
                .insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

/// `s3://BUCKET[/PREFIX]` → (bucket, prefix without slashes at the ends).
///
/// # Errors
/// Not an `s3://` location, a bad bucket name, or a prefix with empty,
/// `.` or `..` parts.
pub fn split_location(location: &str) -> Result<(String, String)> {
    let rest = location
        .strip_prefix("s3://")
        .ok_or_else(|| bad(format!("{location} is not an s3://BUCKET/PREFIX location")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_end_matches('/').to_string();
    if bucket.is_empty()
        || !bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(bad(format!(
            "{location}: {bucket:?} is not a bucket name: use s3://BUCKET/PREFIX"
        )));
    }
    if !prefix.is_empty() && check_name(&prefix).is_err() {
        return Err(bad(format!(
            "{location}: the prefix {prefix:?} has empty, `.` or `..` parts"
        )));
    }
    Ok((bucket.to_string(), prefix))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl S3Config {
    /// Parse `s3://BUCKET[/PREFIX]` and read the rest from the environment
    /// and the AWS profile files.
    ///
    /// # Errors
    /// A malformed location, or no credentials anywhere.
    pub fn from_location(location: &str) -> Result<S3Config> {
        let (bucket, prefix) = split_location(location)?;
        S3Config::from_env(location, &bucket, prefix)
    }

    fn from_env(location: &str, bucket: &str, prefix: String) -> Result<S3Config> {
        let home = env("HOME").map(PathBuf::from).unwrap_or_default();
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let creds_file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/credentials"));
        let config_file = env("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/config"));
        let creds = ini(&creds_file).remove(&profile).unwrap_or_default();
        let mut conf = ini(&config_file);
        let conf = conf
            .remove(&format!("profile {profile}"))
            .or_else(|| conf.remove(&profile))
            .unwrap_or_default();
        let (key, secret, token) = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(k), Some(s)) => (k, s, env("AWS_SESSION_TOKEN")),
            _ => match (
                creds.get("aws_access_key_id"),
                creds.get("aws_secret_access_key"),
            ) {
                (Some(k), Some(s)) => (
                    k.clone(),
                    s.clone(),
                    creds.get("aws_session_token").cloned(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::Denied,
                        format!(
                            "no credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or profile [{profile}] in {}",
                            creds_file.display()
                        ),
                    ));
                }
            },
        };
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| conf.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        let custom = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| conf.get("endpoint_url").cloned());
        let (endpoint, path_style) = match custom {
            Some(e) => (e, true),
            None => (format!("https://s3.{region}.amazonaws.com"), false),
        };
        let endpoint: url::Url = endpoint
            .parse()
            .map_err(|e| bad(format!("AWS_ENDPOINT_URL {endpoint:?} is not a URL: {e}")))?;
        Ok(S3Config {
            endpoint,
            path_style,
            bucket: bucket.to_string(),
            prefix,
            region,
            key,
            secret,
            token,
        })
    }
}

/// An S3 bucket prefix as a backend.
pub struct S3Backend {
    bucket: Bucket,
    creds: Credentials,
    prefix: String,
    agent: ureq::Agent,
    shown: String,
    endpoint: String,
}

/// Requests sent by this process to any S3 store (`LAYBAK_DEBUG` prints it
/// at exit).
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many requests this process sent to S3 stores.
pub fn requests() -> u64 {
    REQUESTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The `<Code>` and `<Message>` of an S3 error body.
fn error_parts(body: &str) -> (String, String) {
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let close = format!("</{t}>");
        body.split_once(&open)
            .and_then(|(_, r)| r.split_once(&close))
            .map(|(v, _)| v.trim().to_string())
            .unwrap_or_default()
    };
    (tag("Code"), tag("Message"))
}

impl S3Backend {
    /// Connect (nothing is sent until the first request).
    ///
    /// # Errors
    /// The configuration cannot make a bucket URL.
    pub fn new(cfg: &S3Config) -> Result<S3Backend> {
        let style = if cfg.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            cfg.endpoint.clone(),
            style,
            cfg.bucket.clone(),
            cfg.region.clone(),
        )
        .map_err(|e| bad(format!("cannot address bucket {}: {e}", cfg.bucket)))?;
        let creds = match &cfg.token {
            Some(t) => Credentials::new_with_token(&cfg.key, &cfg.secret, t),
            None => Credentials::new(&cfg.key, &cfg.secret),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(600)))
            .max_idle_connections_per_host(16)
            .build()
            .into();
        let shown = if cfg.prefix.is_empty() {
            format!("s3://{}", cfg.bucket)
        } else {
            format!("s3://{}/{}", cfg.bucket, cfg.prefix)
        };
        let endpoint = cfg.endpoint.as_str().trim_end_matches('/').to_string();
        Ok(S3Backend {
            bucket,
            creds,
            prefix: cfg.prefix.clone(),
            agent,
            shown,
            endpoint,
        })
    }

    fn count(&self) {
        REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn key(&self, name: &str) -> Result<String> {
        check_name(name)?;
        Ok(if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        })
    }

    /// Whether nothing at all is stored under the prefix (a new
    /// repository goes only into an empty one).
    ///
    /// # Errors
    /// The listing failed.
    pub fn is_empty(&self) -> Result<bool> {
        let dir = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut action = ListObjectsV2::new(&self.bucket, Some(&self.creds));
        action.with_prefix(dir.as_str());
        action.with_max_keys(1);
        let url = action.sign(SIGN_FOR);
        self.count();
        let mut resp = self
            .agent
            .get(url.as_str())
            .call()
            .map_err(|e| self.transport("", e))?;
        if resp.status().as_u16() != 200 {
            return Err(self.fail("", resp));
        }
        let body = self.read_body("", &mut resp)?;
        let page = ListObjectsV2::parse_response(&String::from_utf8_lossy(&body))
            .map_err(|e| bad(format!("{}: unreadable listing: {e}", self.shown)))?;
        Ok(page.contents.is_empty())
    }

    fn transport(&self, name: &str, e: ureq::Error) -> Error {
        use ureq::Error as U;
        let kind = match e {
            U::Io(_) | U::Timeout(_) | U::HostNotFound | U::ConnectionFailed | U::Protocol(_) => {
                ErrorKind::Transient
            }
            _ => ErrorKind::Permanent,
        };
        let why = match e {
            U::BodyExceedsLimit(_) => {
                return Error::new(
                    ErrorKind::Permanent,
                    format!("{name}: the object is larger than laybak ever writes"),
                );
            }
            U::Io(e) => e.to_string(),
            e => e.to_string(),
        };
        Error::new(
            kind,
            format!("cannot reach the store at {}: {why}", self.endpoint),
        )
    }

    /// Turn a non-success answer into a classified error.
    fn status(&self, name: &str, code: u16, body: &str) -> Error {
        let (s3code, msg) = error_parts(body);
        let kind = match code {
            // Only the store saying "no such key" means absent: a 404
            // without it (a proxy, a wrong endpoint path, a missing
            // bucket) must never be taken for a missing object.
            404 if s3code == "NoSuchKey" => ErrorKind::NotFound,
            404 => ErrorKind::Permanent,
            401 | 403 => ErrorKind::Denied,
            408 | 429 | 500 | 502 | 503 | 504 => ErrorKind::Transient,
            400 if s3code == "RequestTimeout" => ErrorKind::Transient,
            409 if s3code == "OperationAborted" || s3code == "ConditionalRequestConflict" => {
                ErrorKind::Transient
            }
            _ => ErrorKind::Permanent,
        };
        let detail = match (s3code.is_empty(), msg.is_empty()) {
            (true, _) => String::new(),
            (false, true) => format!(" {s3code}"),
            (false, false) => format!(" {s3code}: {msg}"),
        };
        let hint = match (code, s3code.as_str()) {
            (404, "NoSuchBucket") => " (create the bucket first: laybak never creates one)",
            (400, "AuthorizationHeaderMalformed") | (400, "InvalidRegion") => {
                " (set AWS_REGION to the store's region)"
            }
            (403, _) | (401, _) => {
                " (check the access key, its secret and its rights on the bucket)"
            }
            _ => "",
        };
        let _ = name; // the repository's context names the object
        Error::new(kind, format!("HTTP {code}{detail}{hint}"))
    }

    fn read_body(
        &self,
        name: &str,
        resp: &mut ureq::http::Response<ureq::Body>,
    ) -> Result<Vec<u8>> {
        resp.body_mut()
            .with_config()
            .limit(MAX_GET)
            .read_to_vec()
            .map_err(|e| self.transport(name, e))
    }

    fn fail(&self, name: &str, mut resp: ureq::http::Response<ureq::Body>) -> Error {
        let code = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        self.status(name, code, &body)
    }

    fn put_with(&self, name: &str, data: &[u8], if_absent: bool) -> Result<Created> {
        let key = self.key(name)?;
        let mut action = PutObject::new(&self.bucket, Some(&self.creds), &key);
        if if_absent {
            action.headers_mut().insert("if-none-match", "*");
        }
        let url = action.sign(SIGN_FOR);
        self.count();
        let mut req = self.agent.put(url.as_str());
        if if_absent {
            req = req.header("if-none-match", "*");
        }
        let resp = req.send(data).map_err(|e| self.transport(name, e))?;
        match resp.status().as_u16() {
            200..=299 => Ok(Created::Yes),
            412 if if_absent => Ok(Created::Existed),
            _ => Err(self.fail(name, resp)),
        }
    }
}

impl Backend for S3Backend {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let key = self.key(name)?;
        let url = GetObject::new(&self.bucket, Some(&self.creds), &key).sign(SIGN_FOR);
        self.count();
        let mut resp = self
            .agent
            .get(url.as_str())
            .call()
            .map_err(|e| self.transport(name, e))?;
        if resp.status().as_u16() != 200 {
            return Err(self.fail(name, resp));
        }
        self.read_body(name, &mut resp)
    }

    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let key = self.key(name)?;
        let range = format!("bytes={offset}-{}", offset + len - 1);
        let mut action = GetObject::new(&self.bucket, Some(&self.creds), &key);
        action.headers_mut().insert("range", range.clone());
        let url = action.sign(SIGN_FOR);
        self.count();
        let mut resp = self
            .agent
            .get(url.as_str())
            .header("range", &range)
            .call()
            .map_err(|e| self.transport(name, e))?;
        let code = resp.status().as_u16();
        if code == 416 {
            return Err(bad(format!(
                "{name}: cannot read {len} bytes at {offset}: the object is shorter"
            )));
        }
        if code != 206 && code != 200 {
            return Err(self.fail(name, resp));
        }
        let mut data = self.read_body(name, &mut resp)?;
        if code == 200 {
            // A server that ignores ranges sends the whole object.
            data = data
                .get(offset as usize..(offset + len) as usize)
                .map(<[u8]>::to_vec)
                .unwrap_or_default();
        }
        if data.len() as u64 != len {
            return Err(bad(format!(
                "{name}: cannot read {len} bytes at {offset}: got {}",
                data.len()
            )));
        }
        Ok(data)
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.put_with(name, data, false).map(|_| ())
    }

    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Created> {
        // Also asked first: stores that ignore the header (Garage) still
        // answer "exists" when the object was there before.
        if self.exists(name)? {
            return Ok(Created::Existed);
        }
        self.put_with(name, data, true)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let dir = format!("{}/", self.key(prefix)?);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, Some(&self.creds));
            action.with_prefix(dir.as_str());
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGN_FOR);
            self.count();
            let mut resp = self
                .agent
                .get(url.as_str())
                .call()
                .map_err(|e| self.transport(prefix, e))?;
            if resp.status().as_u16() != 200 {
                return Err(self.fail(prefix, resp));
            }
            let body = self.read_body(prefix, &mut resp)?;
            let text = String::from_utf8_lossy(&body);
            let page = ListObjectsV2::parse_response(&text).map_err(|e| {
                Error::new(
                    ErrorKind::Transient,
                    format!("{prefix}: unreadable listing from the store: {e}"),
                )
            })?;
            for c in page.contents {
                if let Some(name) = c.key.strip_prefix(&dir) {
                    out.push(Entry {
                        name: name.to_string(),
                        size: c.size.unwrap_or(0),
                    });
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn exists(&self, name: &str) -> Result<bool> {
        // A ranged GET of one byte, not a HEAD: a HEAD answer has no body,
        // so a missing bucket would look like a missing object.
        let key = self.key(name)?;
        let mut action = GetObject::new(&self.bucket, Some(&self.creds), &key);
        action.headers_mut().insert("range", "bytes=0-0");
        let url = action.sign(SIGN_FOR);
        self.count();
        let resp = self
            .agent
            .get(url.as_str())
            .header("range", "bytes=0-0")
            .call()
            .map_err(|e| self.transport(name, e))?;
        match resp.status().as_u16() {
            // 416: an empty object has no byte 0.
            200 | 206 | 416 => Ok(true),
            _ => {
                let e = self.fail(name, resp);
                match e.kind() {
                    ErrorKind::NotFound => Ok(false),
                    _ => Err(e),
                }
            }
        }
    }

    fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name)?;
        let url = DeleteObject::new(&self.bucket, Some(&self.creds), &key).sign(SIGN_FOR);
        self.count();
        let resp = self
            .agent
            .delete(url.as_str())
            .call()
            .map_err(|e| self.transport(name, e))?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            _ => {
                // Deleting what is not there is fine; a missing bucket is not.
                let e = self.fail(name, resp);
                match e.kind() {
                    ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                }
            }
        }
    }

    fn atomic_create(&self) -> bool {
        // Some stores accept If-None-Match and overwrite anyway; laybak's
        // locks and prune do not depend on it.
        false
    }

    fn round_trips(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_from_the_answer() {
        let cfg = S3Config {
            endpoint: "http://127.0.0.1:1".parse().unwrap(),
            path_style: true,
            bucket: "b".into(),
            prefix: "p".into(),
            region: "garage".into(),
            key: "k".into(),
            secret: "s".into(),
            token: None,
        };
        let b = S3Backend::new(&cfg).unwrap();
        let body = "<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>";
        assert_eq!(b.status("x", 404, body).kind(), ErrorKind::NotFound);
        let body = "<Error><Code>NoSuchBucket</Code></Error>";
        let e = b.status("x", 404, body);
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert!(e.to_string().contains("create the bucket"), "{e}");
        assert_eq!(b.status("x", 403, "").kind(), ErrorKind::Denied);
        assert_eq!(
            b.status("x", 404, "<html>not here</html>").kind(),
            ErrorKind::Permanent
        );
        let body = "<Error><Code>RequestTimeout</Code></Error>";
        assert_eq!(b.status("x", 400, body).kind(), ErrorKind::Transient);
        let e = b.status("x", 503, "<Error><Code>ServiceUnavailable</Code><Message>Could not reach quorum</Message></Error>");
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert_eq!(
            e.to_string(),
            "HTTP 503 ServiceUnavailable: Could not reach quorum"
        );
        // Nothing listens on port 1: transient, so it is retried.
        assert_eq!(b.get("config").unwrap_err().kind(), ErrorKind::Transient);
        assert!(b.get("../x").is_err());
    }

    #[test]
    fn locations_parse() {
        let (b, p) = split_location("s3://bucket-1/some/prefix/").unwrap();
        assert_eq!((b.as_str(), p.as_str()), ("bucket-1", "some/prefix"));
        assert_eq!(split_location("s3://b").unwrap().1, "");
        assert!(split_location("s3://").is_err());
        assert!(split_location("s3://b/a/../c").is_err());
        assert!(split_location("s3://b//c").is_err());
        assert!(split_location("s3://b?x/c").is_err());
        assert!(split_location("/tmp/x").is_err());
    }
}
