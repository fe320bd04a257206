//! The access log (`[access_log]`, off by default): one line per request, as
//! JSON or in the combined format with Fulcrum's fields appended.
//!
//! A worker formats the line and hands it to the writer thread through a
//! bounded queue without waiting: when the writer falls behind, lines are
//! dropped and counted (`fulcrum_access_log_dropped_total`), never queued
//! without bound. The writer reopens the file on SIGUSR1 and when the file it
//! writes was moved away or removed (checked every second), so `mv` plus a
//! signal, or plain `logrotate` with `create`, both rotate it.

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::record::RequestRecord;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

/// Lines the queue holds before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Set by SIGUSR1: reopen the file.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Asks every access log to reopen its file (SIGUSR1).
pub fn reopen() {
    REOPEN.store(true, Ordering::Relaxed);
}

/// A running access log.
pub struct AccessLog {
    lines: SyncSender<String>,
    format: AccessLogFormat,
    /// Lines dropped because the writer fell behind.
    pub dropped: AtomicU64,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").field("format", &self.format).finish()
    }
}

impl AccessLog {
    /// Opens the log and starts its writer thread.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<Arc<AccessLog>> {
        let (lines, queue) = std::sync::mpsc::sync_channel(QUEUE);
        let mut sink = Sink::open(config.path.clone())?;
        std::thread::Builder::new()
            .name("fulcrum-access-log".into())
            .spawn(move || sink.run(&queue))?;
        Ok(Arc::new(AccessLog {
            lines,
            format: config.format,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Logs one request; never waits.
    pub fn log(&self, record: &RequestRecord<'_>) {
        let line = match self.format {
            AccessLogFormat::Json => json_line(record),
            AccessLogFormat::Combined => combined_line(record),
        };
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Where lines go: stdout, or a file reopened when rotated.
struct Sink {
    path: Option<PathBuf>,
    out: Box<dyn Write + Send>,
    /// The inode of the file open now, to notice it was moved away.
    inode: Option<u64>,
}

impl Sink {
    fn open(path: Option<PathBuf>) -> std::io::Result<Sink> {
        let Some(path) = path else {
            return Ok(Sink {
                path: None,
                out: Box::new(std::io::BufWriter::new(std::io::stdout())),
                inode: None,
            });
        };
        let (out, inode) = open_file(&path)?;
        Ok(Sink {
            path: Some(path),
            out,
            inode: Some(inode),
        })
    }

    fn run(&mut self, queue: &Receiver<String>) {
        let mut last_check = std::time::Instant::now();
        loop {
            match queue.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let _ = self.out.write_all(line.as_bytes());
                    // Write what else is waiting, then flush once.
                    while let Ok(line) = queue.try_recv() {
                        let _ = self.out.write_all(line.as_bytes());
                    }
                    let _ = self.out.flush();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.out.flush();
                    return;
                }
            }
            let rotated = REOPEN.swap(false, Ordering::Relaxed)
                || (last_check.elapsed() >= Duration::from_secs(1) && {
                    last_check = std::time::Instant::now();
                    self.moved_away()
                });
            if rotated {
                self.reopen();
            }
        }
    }

    /// Whether the path no longer names the file open now.
    fn moved_away(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (&self.path, self.inode) {
            (Some(path), Some(inode)) => std::fs::metadata(path).map_or(true, |m| m.ino() != inode),
            _ => false,
        }
    }

    fn reopen(&mut self) {
        let Some(path) = &self.path else { return };
        let _ = self.out.flush();
        match open_file(path) {
            Ok((out, inode)) => {
                self.out = out;
                self.inode = Some(inode);
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot reopen the access log; writing on to the old file")
            }
        }
    }
}

fn open_file(path: &std::path::Path) -> std::io::Result<(Box<dyn Write + Send>, u64)> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let inode = file.metadata()?.ino();
    Ok((Box::new(std::io::BufWriter::with_capacity(64 * 1024, file)), inode))
}

/// The request line's parts, `-` where unknown (a request refused before its head parsed).
fn request_parts<'a>(record: &'a RequestRecord<'_>) -> (&'a str, &'a str, &'a str) {
    match record.head {
        Some(head) => (
            head.method.as_str(),
            head.path(),
            if head.version == http::Version::HTTP_10 {
                "HTTP/1.0"
            } else if head.version == http::Version::HTTP_2 {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            },
        ),
        None => ("-", "-", "-"),
    }
}

fn header_text<'a>(record: &'a RequestRecord<'_>, name: &str) -> &'a str {
    record
        .head
        .and_then(|h| h.header(name))
        .and_then(crate::http::request::visible_text)
        .unwrap_or("-")
}

/// One JSON object, written straight into one string: a request's line costs
/// one allocation, not a tree of values.
fn json_line(record: &RequestRecord<'_>) -> String {
    use std::fmt::Write as _;
    let (method, path, protocol) = request_parts(record);
    let mut line = String::with_capacity(512);
    let text = |line: &mut String, key: &str, value: Option<&str>| {
        let _ = write!(line, "\"{key}\":");
        match value {
            Some(value) => json_string(line, value),
            None => line.push_str("null"),
        }
        line.push(',');
    };
    line.push('{');
    text(&mut line, "time", Some(&rfc3339(SystemTime::now())));
    text(&mut line, "request_id", record.request_id);
    text(&mut line, "client", Some(&record.client.ip().to_string()));
    text(&mut line, "method", Some(method));
    text(&mut line, "path", Some(path));
    text(&mut line, "query", record.head.and_then(|h| h.query()));
    text(&mut line, "protocol", Some(protocol));
    text(&mut line, "host", record.head.and_then(|h| h.host()));
    text(&mut line, "pool", record.pool.map(|p| p.name.as_str()));
    text(&mut line, "backend", record.backend.map(|b| b.address.as_str()));
    text(&mut line, "policy", record.policy);
    text(&mut line, "termination", Some(record.termination.as_str()));
    let agent = record
        .head
        .and_then(|h| h.header("user-agent"))
        .and_then(crate::http::request::visible_text);
    text(&mut line, "user_agent", agent);
    let seconds = |d: Option<std::time::Duration>| d.map_or("null".to_string(), |d| format!("{:.6}", d.as_secs_f64()));
    let _ = writeln!(
        line,
        "\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration\":{:.6},\"time_to_first_byte\":{},\
         \"connect\":{},\"decision\":{:.9},\"retries\":{}}}",
        record.status.as_u16(),
        record.bytes_in,
        record.bytes_out,
        record.duration.as_secs_f64(),
        seconds(record.to_response_head),
        seconds(record.connect),
        record.decision.as_secs_f64(),
        record.retries,
    );
    line
}

/// `value` as a JSON string: quoted, with quotes, backslashes and control
/// characters escaped.
fn json_string(out: &mut String, value: &str) {
    use std::fmt::Write as _;
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn combined_line(record: &RequestRecord<'_>) -> String {
    let (method, path, protocol) = request_parts(record);
    let query = record.head.and_then(|h| h.query());
    let target = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let optional = |d: Option<std::time::Duration>| d.map_or("-".to_string(), |d| format!("{:.6}", d.as_secs_f64()));
    format!(
        "{client} - - [{time}] \"{method} {target} {protocol}\" {status} {bytes} \"{referer}\" \"{agent}\" \
         request_id={id} pool={pool} backend={backend} policy={policy} decision={decision:.9} retries={retries} \
         connect={connect} ttfb={ttfb} duration={duration:.6} bytes_in={bytes_in} termination={termination}\n",
        client = record.client.ip(),
        time = clf_time(SystemTime::now()),
        target = target.escape_debug(),
        status = record.status.as_u16(),
        bytes = record.bytes_out,
        referer = header_text(record, "referer").escape_debug(),
        agent = header_text(record, "user-agent").escape_debug(),
        id = record.request_id.unwrap_or("-"),
        pool = record.pool.map_or("-", |p| p.name.as_str()),
        backend = record.backend.map_or("-", |b| b.address.as_str()),
        policy = record.policy.unwrap_or("-"),
        decision = record.decision.as_secs_f64(),
        retries = record.retries,
        connect = optional(record.connect),
        ttfb = optional(record.to_response_head),
        duration = record.duration.as_secs_f64(),
        bytes_in = record.bytes_in,
        termination = record.termination.as_str(),
    )
}

/// Days since 1970-01-01 as (year, month, day) (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// UTC parts of `time`: (year, month, day, hour, minute, second, millisecond).
fn utc(time: SystemTime) -> (i64, u32, u32, u64, u64, u64, u32) {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil((secs / 86_400) as i64);
    let rest = secs % 86_400;
    (
        year,
        month,
        day,
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis(),
    )
}

/// `2026-11-29T23:27:01.123Z`
fn rfc3339(time: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ms) = utc(time);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

/// `29/Nov/2026:23:27:01 +0000`, the combined format's time.
fn clf_time(time: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s, _) = utc(time);
    let month = MONTHS[(mo as usize).saturating_sub(1).min(11)];
    format!("{d:02}/{month}/{y:04}:{h:02}:{mi:02}:{s:02} +0000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, "\"a\\\"b\\\\c\\nd\\u0001é\"");
        let parsed: String = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(parsed, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn times_are_written_in_utc() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_994_821_123);
        assert_eq!(rfc3339(time), "2026-11-29T23:27:01.123Z");
        assert_eq!(clf_time(time), "29/Nov/2026:23:27:01 +0000");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
