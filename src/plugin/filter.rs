//! A route's use of a filter plugin: [`Filter`], whose [`Filter::on_request`]
//! and [`Filter::on_response`] the request path calls, and the host's own
//! types for what a filter decides ([`FilterVerdict`], [`HeaderEdit`],
//! [`RequestChanges`]). An answer the host cannot use (a bad status, an
//! oversized body) is a fault like a trap; a single bad header edit is only
//! skipped, and logged once per filter.

use super::engine::{CurrentRequest, StoreState, deadline_ticks};
use super::instances::{Binding, Fault, PluginSlot};
use super::world::{PluginInstance, PluginWorld, v2};
use super::{Limits, Tickets};
use crate::http::h1::ResponseHead;
use bytes::Bytes;
use http::StatusCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use v2::exports::fulcrum::plugin::request_filter::Verdict as WitVerdict;
use v2::fulcrum::plugin::types::{EditOp as WitEditOp, HeaderEdit as WitHeaderEdit};

/// Largest body a filter may answer with.
pub const MAX_DIRECT_BODY: usize = 64 * 1024;

/// Headers a filter may not edit: the connection's and the framing's, and
/// those the host writes for the hop, which it writes itself.
const PROTECTED: [&str; 17] = [
    "trailer",
    "expect",
    "x-request-id",
    "connection",
    "content-length",
    "transfer-encoding",
    "host",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-client-cert",
    "forwarded",
    "via",
];

pub use crate::http::edit::{EditOp, HeaderEdit};

/// What the route's filters changed so far: seen by later filters and the
/// balancer, applied to the request sent upstream.
#[derive(Debug, Default)]
pub struct RequestChanges {
    pub headers: Vec<HeaderEdit>,
    pub metadata: Vec<(String, String)>,
}

impl RequestChanges {
    /// No changes: what requests without filters carry.
    pub fn none() -> &'static RequestChanges {
        static NONE: RequestChanges = RequestChanges {
            headers: Vec::new(),
            metadata: Vec::new(),
        };
        &NONE
    }

    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.metadata.is_empty()
    }
}

/// A filter's answer in place of a backend's.
#[derive(Debug, Clone)]
pub struct DirectResponse {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// What a filter decided about a request.
#[derive(Debug)]
pub enum FilterVerdict {
    Proceed {
        headers: Vec<HeaderEdit>,
        pool: Option<String>,
        metadata: Vec<(String, String)>,
        wants_response: bool,
    },
    Respond(DirectResponse),
}

/// What to do with a request when its filter faults (`on_fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFault {
    /// Let the request go on, as if the filter had passed it.
    #[default]
    Allow,
    /// Answer 503: the request is not let through unchecked.
    Deny,
}

/// A route's use of a filter plugin, with its config.
pub struct Filter {
    pub name: String,
    binding: Binding<PluginWorld>,
    pub on_fault: OnFault,
    /// A bad edit was logged already (once per filter, not per request).
    warned: AtomicBool,
}

impl Filter {
    pub fn new(
        name: &str,
        slot: Arc<PluginSlot<PluginWorld>>,
        config: &str,
        limits: Limits,
        on_fault: OnFault,
        tickets: Tickets,
    ) -> Filter {
        Filter {
            name: name.to_string(),
            binding: Binding::new(slot, config, limits, tickets),
            on_fault,
            warned: AtomicBool::new(false),
        }
    }

    pub fn slot(&self) -> &Arc<PluginSlot<PluginWorld>> {
        self.binding.slot()
    }

    /// Waits for this filter's instances started in the background.
    pub fn wait_ready(&self, within: std::time::Duration) {
        self.binding.wait_ready(within);
    }

    /// Asks the filter about `request`. `pool_exists` says whether a pool
    /// override names a pool there is.
    pub fn on_request(
        &self,
        request: &CurrentRequest<'_>,
        pool_exists: impl Fn(&str) -> bool,
    ) -> Result<FilterVerdict, Fault> {
        let limits = self.binding.limits;
        let verdict = self.binding.call(
            |live| {
                let PluginInstance::Current {
                    filter: Some(filter), ..
                } = &live.instance
                else {
                    return Err(wasmtime::Error::msg(
                        "the plugin exports no filter (`fulcrum:plugin/request-filter@0.2.0`)",
                    ));
                };
                live.store.set_epoch_deadline(deadline_ticks(limits.call_timeout));
                StoreState::with_request(&mut live.store, request, None, |store| filter.call_on_request(store))
            },
            |verdict| match verdict {
                WitVerdict::Respond(answer) if !(200..=599).contains(&answer.status) => {
                    Err(self.bad_answer(format!("answered with status {}", answer.status)))
                }
                WitVerdict::Respond(answer) if answer.body.len() > MAX_DIRECT_BODY => Err(self.bad_answer(format!(
                    "answered with a body of {} bytes (at most {MAX_DIRECT_BODY})",
                    answer.body.len()
                ))),
                WitVerdict::Proceed(changes) => match &changes.pool {
                    Some(pool) if !pool_exists(pool) => {
                        Err(self.bad_answer(format!("sent the request to pool `{pool}`, which does not exist")))
                    }
                    _ => Ok(()),
                },
                WitVerdict::Respond(_) => Ok(()),
            },
        )?;
        Ok(match verdict {
            WitVerdict::Proceed(changes) => FilterVerdict::Proceed {
                headers: self.checked_edits(changes.headers),
                pool: changes.pool,
                metadata: changes.metadata,
                wants_response: changes.wants_response,
            },
            WitVerdict::Respond(mut answer) => FilterVerdict::Respond(DirectResponse {
                // Checked within 200..=599 above.
                status: StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                headers: answer
                    .headers
                    .into_iter()
                    .filter(|(name, value)| self.valid_header(name, value))
                    .collect(),
                // 204 and 304 have no body (RFC 9110 15.3.5, 15.4.5).
                body: if matches!(answer.status, 204 | 304) {
                    answer.body.clear();
                    Bytes::new()
                } else {
                    Bytes::from(answer.body)
                },
            }),
        })
    }

    /// Asks the filter for edits to `response`'s headers (a fault: none).
    pub fn on_response(&self, request: &CurrentRequest<'_>, response: &ResponseHead) -> Vec<HeaderEdit> {
        let limits = self.binding.limits;
        let edits = self.binding.call(
            |live| {
                let PluginInstance::Current {
                    filter: Some(filter), ..
                } = &live.instance
                else {
                    return Err(wasmtime::Error::msg("the plugin exports no filter"));
                };
                live.store.set_epoch_deadline(deadline_ticks(limits.call_timeout));
                StoreState::with_request(&mut live.store, request, Some(response), |store| {
                    filter.call_on_response(store)
                })
            },
            |_| Ok(()),
        );
        edits.map_or_else(|_| Vec::new(), |edits| self.checked_edits(edits))
    }

    /// A fault for an answer the host cannot use, logged.
    fn bad_answer(&self, what: String) -> Fault {
        tracing::warn!(filter = %self.name, plugin = %self.binding.slot().name, "filter {what}; treated as a fault");
        Fault::BadAnswer(what)
    }

    /// The edits that are valid, lower-cased; the others skipped (logged once).
    fn checked_edits(&self, edits: Vec<WitHeaderEdit>) -> Vec<HeaderEdit> {
        edits
            .into_iter()
            .filter(|edit| {
                let value = if edit.op == WitEditOp::Remove { "" } else { &edit.value };
                self.valid_header(&edit.name, value)
            })
            .map(|edit| HeaderEdit {
                op: match edit.op {
                    WitEditOp::Set => EditOp::Set,
                    WitEditOp::Append => EditOp::Append,
                    WitEditOp::Remove => EditOp::Remove,
                },
                name: edit.name.to_ascii_lowercase(),
                value: edit.value,
            })
            .collect()
    }

    /// Whether a header may be written as a filter asks; says why not once.
    fn valid_header(&self, name: &str, value: &str) -> bool {
        let problem = if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            Some("is not a valid header name")
        } else if http::HeaderValue::from_str(value).is_err() {
            Some("has a value that is not valid in a header")
        } else if PROTECTED.iter().any(|p| p.eq_ignore_ascii_case(name)) {
            Some("is the host's to write")
        } else {
            None
        };
        if let Some(problem) = problem {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(filter = %self.name, header = name, "a filter's header edit was skipped: the header {problem} (said once per filter)");
            }
            return false;
        }
        true
    }
}
