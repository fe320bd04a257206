//! The one debounced file watcher: everything Fulcrum reloads from disk (the
//! config file, the plugin directory, TLS certificates and keys) is watched by one
//! `notify` watcher and handled on one thread.
//!
//! A changed file is handed to the [`Handler`] that claims it once it has not
//! changed for [`SETTLE_TIME`], so an editor's or a copy's several writes make
//! one reload. A handler may ask to look again later (a copy still going on).
//!
//! File events are not enough alone: a watch follows a directory's inode, so
//! a directory replaced whole (a deploy's rename, a Kubernetes ConfigMap's
//! symlink swap) sends no more events. Every [`POLL_EVERY`] each handler is
//! also asked which of its files changed by their size and modification time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

/// How long a file must stay unchanged before it is handled.
pub const SETTLE_TIME: Duration = Duration::from_millis(200);

/// How often settled files are looked for.
const TICK: Duration = Duration::from_millis(50);

/// How often handlers look at their files' stamps, for changes no event told.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// A file's size and modification time (of the file a symlink points to):
/// what changes while it is written, and what a poll compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// The file itself (device, inode): a swap to another file of the same
    /// size and time (`cp -p`, builds that pin times) is a change too.
    file: (u64, u64),
}

impl FileStamp {
    /// None when the file is gone.
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            file: (meta.dev(), meta.ino()),
        })
    }
}

/// What a handler made of a settled file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Dealt with (loaded, refused or gone).
    Done,
    /// Not ready: look again at the next tick.
    Later,
}

/// Reacts to the files it claims once they have settled.
pub trait Handler: Send + 'static {
    /// Whether `path` is one of this handler's files.
    fn claims(&self, path: &Path) -> bool;
    /// `path` has not changed for `quiet` (at least [`SETTLE_TIME`]).
    fn settled(&mut self, path: &Path, quiet: Duration) -> Settled;
    /// Files of this handler's that changed since it last looked, found
    /// without events (every [`POLL_EVERY`]); they settle as if an event came.
    fn poll(&mut self) -> Vec<PathBuf> {
        Vec::new()
    }
}

enum Message {
    Changed(PathBuf),
    Handle(Box<dyn Handler>),
}

/// The watcher; dropping it stops the watching thread.
pub struct FileWatcher {
    watcher: notify::RecommendedWatcher,
    messages: Sender<Message>,
}

impl FileWatcher {
    /// Starts the watching thread, with nothing watched yet.
    pub fn start() -> Result<FileWatcher, notify::Error> {
        let (messages, inbox) = channel::<Message>();
        let changes = messages.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Some(event) = event.ok().filter(is_change) {
                for path in event.paths {
                    let _ = changes.send(Message::Changed(path));
                }
            }
        })?;
        std::thread::Builder::new()
            .name("fulcrum-watch".into())
            .spawn(move || run(&inbox))
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(FileWatcher { watcher, messages })
    }

    /// Watches the files directly in `dir` for `handler`.
    pub fn watch(&mut self, dir: &Path, handler: Box<dyn Handler>) -> Result<(), notify::Error> {
        self.watch_folder(dir)?;
        self.add_handler(handler)
    }

    /// Watches the files directly in `dir` (for handlers added before or after).
    pub fn watch_folder(&mut self, dir: &Path) -> Result<(), notify::Error> {
        use notify::Watcher;
        self.watcher.watch(dir, notify::RecursiveMode::NonRecursive)
    }

    /// Hands changed files it claims to `handler`, whichever watched folder
    /// they are in.
    pub fn add_handler(&mut self, handler: Box<dyn Handler>) -> Result<(), notify::Error> {
        self.messages
            .send(Message::Handle(handler))
            .map_err(|_| notify::Error::generic("the watching thread has stopped"))
    }
}

/// The watching thread: gathers changes, hands settled files to their handlers.
fn run(inbox: &std::sync::mpsc::Receiver<Message>) {
    let mut handlers: Vec<Box<dyn Handler>> = Vec::new();
    // Changed files not dealt with yet, with their last change.
    let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
    let mut polled = Instant::now();
    let mut ticked = Instant::now();
    loop {
        match inbox.recv_timeout(TICK) {
            Ok(Message::Changed(path)) => {
                if handlers.iter().any(|h| h.claims(&path)) {
                    pending.insert(path, Instant::now());
                }
            }
            Ok(Message::Handle(handler)) => handlers.push(handler),
            Err(RecvTimeoutError::Timeout) => {}
            // The watcher was dropped: its callback's sender went with it.
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Once a tick, even while events keep coming (a busy folder must not
        // hold back the files that settled, or the poll).
        if ticked.elapsed() < TICK {
            continue;
        }
        ticked = Instant::now();
        if polled.elapsed() >= POLL_EVERY {
            polled = Instant::now();
            for path in handlers.iter_mut().flat_map(|h| h.poll()) {
                pending.entry(path).or_insert_with(Instant::now);
            }
        }
        pending.retain(|path, changed| {
            let quiet = changed.elapsed();
            if quiet < SETTLE_TIME {
                return true;
            }
            let mut again = false;
            for handler in handlers.iter_mut().filter(|h| h.claims(path)) {
                again |= handler.settled(path, quiet) == Settled::Later;
            }
            again
        });
    }
}

/// Whether a file event is a change of content or name. Reading a file raises
/// access events of its own, which must not trigger another reload.
fn is_change(event: &notify::Event) -> bool {
    use notify::EventKind;
    matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records each settled `*.txt` file.
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Handler for Recorder {
        fn claims(&self, path: &Path) -> bool {
            path.extension().is_some_and(|e| e == "txt")
        }

        fn settled(&mut self, path: &Path, quiet: Duration) -> Settled {
            assert!(quiet >= SETTLE_TIME);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(name);
            Settled::Done
        }
    }

    #[test]
    fn several_writes_settle_into_one_call_and_unclaimed_files_are_ignored() {
        let dir = std::env::temp_dir().join(format!("fulcrum-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut watcher = FileWatcher::start().expect("watcher");
        watcher.watch(&dir, Box::new(Recorder(seen.clone()))).expect("watch");
        for i in 0..5 {
            std::fs::write(dir.join("a.txt"), format!("version {i}")).expect("write");
            std::fs::write(dir.join("b.other"), "ignored").expect("write");
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap_or_else(|p| p.into_inner()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(SETTLE_TIME * 2);
        drop(watcher);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(*seen.lock().unwrap_or_else(|p| p.into_inner()), ["a.txt"]);
    }
}
