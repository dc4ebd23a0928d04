//! Routes translate HTTP into calls on the capability modules, and nothing more: parsing
//! and validation happen in extractors and domain types, decisions in the modules.
//!
//! The route table is data. Each routes module has a `configure` at its top that adds its
//! routes to a [`Routes`] table: method, full path, handler and [`Access`]. [`configure`]
//! merges the modules' tables and registers them with actix; [`table`] gives the same list
//! to whoever must check against it (the OpenAPI document reads each operation's gate from
//! it, and `tests/api/openapi.rs` compares it with the document and the running server).
//! A module never wraps its own routes: the gate follows from the [`Access`], so a route
//! cannot be registered without one.

pub mod accounts;
pub mod admin;
pub mod alerts;
pub mod billing;
pub mod credits;
pub mod docs;
pub mod events;
pub mod gateway;
pub mod health;
pub mod jobs;
pub mod keys;
pub mod metrics;

use actix_web::dev::{Handler, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::from_fn;
use actix_web::{web, FromRequest, Resource, Responder, Route};

use crate::http::ratelimit_gate;

/// The edge enforces the configured webhook limit before routing; this is only the
/// extractor's ceiling.
const WEBHOOK_BODY_LIMIT_MAX: usize = 16 * 1024 * 1024;

/// The scope every keyed route lives under, behind the keyed gate.
const KEYED_SCOPE: &str = "/v1";
/// The scope of the operator's API. Its handlers check the admin token themselves (the
/// `AdminToken` extractor), so unknown paths under it stay plain 404s.
const ADMIN_SCOPE: &str = "/admin";

/// Who may call a route. It decides where the route is registered and which gate is in
/// front of it, and the document describes the same gate from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a limit: health checks, the document and its page.
    Open,
    /// Anyone, behind the per-IP gate (signup, login).
    PerIp,
    /// Stripe's webhook: authenticated by the body's signature, not by key, and not limited
    /// per IP because Stripe's deliveries come in bursts from Stripe's addresses. Its body
    /// may be as large as the edge's webhook limit.
    Signed,
    /// An API key, under `/v1` behind the keyed gate (authenticate, then the tier's limit).
    /// The gate wraps the whole scope, so an unknown `/v1/…` path is authenticated and
    /// limited like a known one.
    Key,
    /// The operator's token, under `/admin`.
    Admin,
    /// Gateway mode's authorizer (`/v1/authz`): the handler runs the keyed gate's checks
    /// itself (`ratelimit_gate::admit`), so that its refusals can carry what proxies need.
    /// Registered outside the keyed scope, before it.
    Gateway,
    /// The operator's servers, with a service token (`KEYMETER_SERVICE_TOKENS`): registered
    /// outside the keyed scope, before it; the handler's `ServiceToken` extractor checks it.
    Service,
}

/// One registered operation, as the checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub method: Method,
    /// The full path pattern, as actix matches it and the document names it.
    pub path: &'static str,
    pub access: Access,
}

struct Entry {
    info: RouteInfo,
    route: Route,
}

/// The route table the modules fill; see the module comment.
#[derive(Default)]
pub struct Routes {
    entries: Vec<Entry>,
}

impl Routes {
    /// Adds `method path` → `handler`. `path` is the full path (`/v1/keys`), the one the
    /// document uses; a `Key` route's must start with `/v1/`, an `Admin` route's with
    /// `/admin/` (a unit test holds every route to it).
    pub fn add<F, Args>(
        &mut self,
        access: Access,
        method: Method,
        path: &'static str,
        handler: F,
    ) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        let route = web::route().method(method.clone()).to(handler);
        self.entries.push(Entry {
            info: RouteInfo {
                method,
                path,
                access,
            },
            route,
        });
        self
    }

    pub fn get<F, Args>(&mut self, access: Access, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(access, Method::GET, path, handler)
    }

    pub fn post<F, Args>(&mut self, access: Access, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(access, Method::POST, path, handler)
    }

    pub fn put<F, Args>(&mut self, access: Access, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(access, Method::PUT, path, handler)
    }

    pub fn patch<F, Args>(&mut self, access: Access, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(access, Method::PATCH, path, handler)
    }

    pub fn delete<F, Args>(&mut self, access: Access, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(access, Method::DELETE, path, handler)
    }

    /// The table's routes grouped into resources (one per access and path, its methods in
    /// the order added): actix answers 405 for a method a resource lacks only when all of
    /// a path's methods sit on one resource.
    fn resources(self) -> Vec<(Access, &'static str, Vec<Route>)> {
        let mut out: Vec<(Access, &'static str, Vec<Route>)> = Vec::new();
        for Entry { info, route } in self.entries {
            match out
                .iter_mut()
                .find(|(a, p, _)| *a == info.access && *p == info.path)
            {
                Some((_, _, routes)) => routes.push(route),
                None => out.push((info.access, info.path, vec![route])),
            }
        }
        out
    }
}

/// Every module's routes, in registration order.
fn all() -> Routes {
    let mut routes = Routes::default();
    for configure in [
        health::configure,
        docs::configure,
        accounts::configure,
        alerts::configure,
        keys::configure,
        credits::configure,
        billing::configure,
        jobs::configure,
        gateway::configure,
        events::configure,
        admin::configure,
    ] {
        configure(&mut routes);
    }
    routes
}

/// Every registered operation: the list the document and the tests are checked against.
pub fn table() -> Vec<RouteInfo> {
    all().entries.into_iter().map(|e| e.info).collect()
}

/// Registers every route. Routes outside the scopes come first, so `/v1/signup`, `/v1/login`
/// and `/v1/billing/webhook` are matched before the keyed `/v1` scope could claim them.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let mut keyed = web::scope(KEYED_SCOPE).wrap(from_fn(ratelimit_gate::keyed));
    let mut admin = web::scope(ADMIN_SCOPE);
    // actix tries resources in registration order, a pattern match each. The authorizer is
    // called for every request a proxy forwards, so it goes right after the health checks
    // (which load balancers call as often) instead of behind every other route; no earlier
    // resource can match a `/v1/authz` path, so the order decides nothing else.
    let mut resources = all().resources();
    resources.sort_by_key(|(access, path, _)| match access {
        Access::Open if path.starts_with("/health/") => 0,
        Access::Gateway => 1,
        _ => 2,
    });
    for (access, path, routes) in resources {
        match access {
            Access::Open => {
                cfg.service(with_routes(web::resource(path), routes));
            }
            Access::PerIp => {
                let resource = web::resource(path).wrap(from_fn(ratelimit_gate::public));
                cfg.service(with_routes(resource, routes));
            }
            Access::Signed => {
                let resource =
                    web::resource(path).app_data(web::PayloadConfig::new(WEBHOOK_BODY_LIMIT_MAX));
                cfg.service(with_routes(resource, routes));
            }
            Access::Gateway | Access::Service => {
                // `{path}` of the authorizer takes the rest of the path, slashes and all.
                let pattern = path.replace("{path}", "{path:.*}");
                cfg.service(with_routes(web::resource(pattern), routes));
            }
            Access::Key => {
                let local = path.strip_prefix(KEYED_SCOPE).unwrap_or(path);
                keyed = keyed.service(with_routes(web::resource(local), routes));
            }
            Access::Admin => {
                let local = path.strip_prefix(ADMIN_SCOPE).unwrap_or(path);
                admin = admin.service(with_routes(web::resource(local), routes));
            }
        }
    }
    cfg.service(keyed).service(admin);
}

/// A resource serving each of `routes` (each carries its own method guard).
fn with_routes<T>(mut resource: Resource<T>, routes: Vec<Route>) -> Resource<T>
where
    T: ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
{
    for route in routes {
        resource = resource.route(route);
    }
    resource
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn scoped_routes_lie_inside_their_scope_and_no_route_is_added_twice() {
        let under = |path: &str, scope: &str| {
            path.strip_prefix(scope)
                .is_some_and(|rest| rest.starts_with('/'))
        };
        let mut seen = BTreeSet::new();
        for r in table() {
            let (method, path, access) = (&r.method, r.path, r.access);
            match access {
                Access::Key => assert!(under(path, KEYED_SCOPE), "{method} {path}"),
                Access::Admin => assert!(under(path, ADMIN_SCOPE), "{method} {path}"),
                // Outside the scopes, only public routes may sit under `/v1` (registered
                // before the keyed scope, they are matched first), and none under `/admin`.
                Access::PerIp | Access::Signed | Access::Gateway | Access::Service => {
                    assert!(!under(path, ADMIN_SCOPE))
                }
                Access::Open => assert!(
                    !under(path, KEYED_SCOPE) && !under(path, ADMIN_SCOPE),
                    "{method} {path}"
                ),
            }
            assert!(
                seen.insert((method.to_string(), path)),
                "{method} {path} is added twice"
            );
        }
    }
}
