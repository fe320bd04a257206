//! Filters: the [`Filter`] trait, and builders for its verdicts
//! ([`Proceed`], [`Respond`]).

pub use crate::bindings::exports::fulcrum::plugin::request_filter::Verdict;
use crate::bindings::exports::fulcrum::plugin::request_filter::{DirectResponse, RequestChanges};
pub use crate::bindings::fulcrum::plugin::response;
use crate::{EditOp, HeaderEdit};

/// A request filter, run after routing and before the balancer.
pub trait Filter: crate::Plugin {
    /// Decides on the current request (read through [`crate::request`]):
    /// `Proceed::new().into()` to let it go on, a [`Respond`] to answer it.
    fn on_request(&mut self) -> Verdict;

    /// Edits to the response's headers, for requests whose verdict asked
    /// ([`Proceed::wants_response`]); [`response`] reads the response.
    fn on_response(&mut self) -> Vec<HeaderEdit> {
        Vec::new()
    }
}

/// A request that goes on, with changes.
#[derive(Debug, Clone, Default)]
pub struct Proceed {
    headers: Vec<HeaderEdit>,
    pool: Option<String>,
    metadata: Vec<(String, String)>,
    wants_response: bool,
}

impl Proceed {
    pub fn new() -> Proceed {
        Proceed::default()
    }

    fn edit(mut self, op: EditOp, name: &str, value: &str) -> Proceed {
        self.headers.push(HeaderEdit {
            op,
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Replaces header `name` (adds it if absent).
    pub fn set_header(self, name: &str, value: &str) -> Proceed {
        self.edit(EditOp::Set, name, value)
    }

    /// Adds a header field, keeping any already there.
    pub fn append_header(self, name: &str, value: &str) -> Proceed {
        self.edit(EditOp::Append, name, value)
    }

    pub fn remove_header(self, name: &str) -> Proceed {
        self.edit(EditOp::Remove, name, "")
    }

    /// Sends the request to `pool` instead of the route's.
    pub fn pool(mut self, pool: &str) -> Proceed {
        self.pool = Some(pool.into());
        self
    }

    /// Metadata later filters and the balancer read (`request::metadata`).
    pub fn metadata(mut self, key: &str, value: &str) -> Proceed {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Asks for `on_response` on this request.
    pub fn wants_response(mut self) -> Proceed {
        self.wants_response = true;
        self
    }
}

impl From<Proceed> for Verdict {
    fn from(proceed: Proceed) -> Verdict {
        Verdict::Proceed(RequestChanges {
            headers: proceed.headers,
            pool: proceed.pool,
            metadata: proceed.metadata,
            wants_response: proceed.wants_response,
        })
    }
}

/// The balancer's own answer to a request.
#[derive(Debug, Clone)]
pub struct Respond {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Respond {
    /// An answer with `status` (200 to 599) and no body.
    pub fn status(status: u16) -> Respond {
        Respond {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Respond {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The body (at most 64 KiB), as text with `content-type: text/plain`
    /// unless a content type was given.
    pub fn text(mut self, body: &str) -> Respond {
        if !self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
            self.headers
                .push(("content-type".into(), "text/plain; charset=utf-8".into()));
        }
        self.body = body.as_bytes().to_vec();
        self
    }

    pub fn body(mut self, body: Vec<u8>) -> Respond {
        self.body = body;
        self
    }
}

impl From<Respond> for Verdict {
    fn from(respond: Respond) -> Verdict {
        Verdict::Respond(DirectResponse {
            status: respond.status,
            headers: respond.headers,
            body: respond.body,
        })
    }
}
