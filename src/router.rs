//! Route matching: which pool serves a request, by host and path prefix.
//!
//! Routes are ordered once, when a config is loaded: routes that name a host
//! before those that do not, longer path prefixes before shorter ones, and the
//! config's order among equals. A request then takes the first route it matches.

use crate::config::RouteConfig;

/// A compiled route table; pools are referred to by index.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
}

#[derive(Debug, Clone)]
struct Route {
    host: Option<String>,
    path_prefix: String,
    pool: usize,
    max_body_size: Option<u64>,
    /// Its index in the config's `[[routes]]`.
    order: usize,
    body_prefix: usize,
}

/// The route a request matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    /// The pool's index.
    pub pool: usize,
    /// The largest request body the route takes.
    pub max_body_size: Option<u64>,
    /// The route's index in the config's `[[routes]]` (its filters are found by it).
    pub route: usize,
    /// The route's `body_prefix`.
    pub body_prefix: usize,
}

impl Router {
    /// Builds a router; `pool_index` maps a pool name to its index.
    pub fn new(routes: &[RouteConfig], pool_index: impl Fn(&str) -> Option<usize>) -> Router {
        let mut compiled: Vec<(usize, Route)> = routes
            .iter()
            .enumerate()
            .filter_map(|(order, r)| {
                let pool = pool_index(&r.pool)?;
                Some((
                    order,
                    Route {
                        host: r.host.clone(),
                        path_prefix: r.path_prefix.clone(),
                        pool,
                        max_body_size: r.max_body_size,
                        order,
                        body_prefix: r.body_prefix,
                    },
                ))
            })
            .collect();
        compiled.sort_by(|(oa, a), (ob, b)| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.path_prefix.len().cmp(&a.path_prefix.len()))
                .then(oa.cmp(ob))
        });
        Router {
            routes: compiled.into_iter().map(|(_, r)| r).collect(),
        }
    }

    /// The pool for a request to `host` (may carry a port; any case) and `path`.
    pub fn pool_for(&self, host: Option<&str>, path: &str) -> Option<usize> {
        self.route_for(host, path).map(|m| m.pool)
    }

    /// The route a request to `host` and `path` takes.
    pub fn route_for(&self, host: Option<&str>, path: &str) -> Option<Matched> {
        let host = host.map(strip_port);
        self.routes
            .iter()
            .find(|r| {
                let host_ok = match (&r.host, host) {
                    (None, _) => true,
                    (Some(want), Some(have)) => want.eq_ignore_ascii_case(have),
                    (Some(_), None) => false,
                };
                host_ok && path.starts_with(r.path_prefix.as_str())
            })
            .map(|r| Matched {
                pool: r.pool,
                max_body_size: r.max_body_size,
                route: r.order,
                body_prefix: r.body_prefix,
            })
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    // A byte search: `rsplit_once(':')` runs the generic char searcher, several
    // times the instructions once it is not inlined (callgrind, per request).
    match host.bytes().rposition(|b| b == b':') {
        Some(colon) => &host[..colon],
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str, pool: &str) -> RouteConfig {
        RouteConfig {
            host: host.map(str::to_string),
            path_prefix: prefix.into(),
            pool: pool.into(),
            max_body_size: None,
            filters: Vec::new(),
            body_prefix: 0,
        }
    }

    fn router() -> Router {
        let routes = [
            route(None, "/", "default"),
            route(None, "/api", "api"),
            route(Some("admin.example.com"), "/", "admin"),
        ];
        Router::new(&routes, |name| {
            ["default", "api", "admin"].iter().position(|p| *p == name)
        })
    }

    #[test]
    fn host_routes_win_then_longest_prefix() {
        let r = router();
        assert_eq!(r.pool_for(Some("admin.example.com:8080"), "/api/x"), Some(2));
        assert_eq!(r.pool_for(Some("ADMIN.example.com"), "/"), Some(2));
        assert_eq!(r.pool_for(Some("www.example.com"), "/api/users"), Some(1));
        assert_eq!(r.pool_for(None, "/index.html"), Some(0));
    }

    #[test]
    fn no_match_is_none() {
        let r = Router::new(&[route(Some("a.example"), "/x", "p")], |_| Some(0));
        assert_eq!(r.pool_for(Some("b.example"), "/x"), None);
        assert_eq!(r.pool_for(Some("a.example"), "/y"), None);
    }

    #[test]
    fn ipv6_hosts_keep_their_brackets() {
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
