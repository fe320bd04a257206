//! The plugin world as the instance cache sees it: the bindings of
//! `fulcrum:plugin@0.2.0` (wit/) and of the frozen 0.1.0 balancer
//! (src/plugin/wit-0.1.0/), one linker with both, and [`PluginWorld`], which
//! binds a component of either version to what it exports.
//!
//! A 0.2.0 component exports `lifecycle` and `balancer`, `filter` or both;
//! which ones is looked up once per version ([`Exports`]). A 0.1.0 component
//! exports `policy@0.1.0` and serves as a balancer only, through the same
//! [`PluginInstance`] (the balancer adapts its calls: see balancer.rs).

use super::engine::{Runtime, StoreState};
use super::instances::{Cache, World};
use std::cell::RefCell;
use std::sync::OnceLock;
use std::thread::LocalKey;
use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

/// `fulcrum:plugin@0.2.0`: every import and export, from the world that has them all.
pub mod v2 {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "balancer-and-filter",
    });
}

/// `fulcrum:plugin@0.1.0`, frozen: what components built before 0.2.0 import and export.
pub mod v1 {
    wasmtime::component::bindgen!({
        path: "src/plugin/wit-0.1.0",
        world: "balancer",
    });
}

use v2::exports::fulcrum::plugin::{lifecycle, policy as balancer, request_filter as filter};

/// The export a 0.1.0 balancer has.
const V1_POLICY: &str = "fulcrum:plugin/policy@0.1.0";

/// What a component version exports, looked up once when it is bound.
pub enum Exports {
    Current {
        lifecycle: lifecycle::GuestIndices,
        balancer: Option<balancer::GuestIndices>,
        filter: Option<filter::GuestIndices>,
    },
    Legacy(v1::BalancerPre<StoreState>),
}

/// A component bound to the plugin world, ready to instantiate.
pub struct PluginPre {
    pre: InstancePre<StoreState>,
    pub exports: Exports,
}

impl PluginPre {
    pub fn is_balancer(&self) -> bool {
        match &self.exports {
            Exports::Current { balancer, .. } => balancer.is_some(),
            Exports::Legacy(_) => true,
        }
    }

    pub fn is_filter(&self) -> bool {
        matches!(&self.exports, Exports::Current { filter: Some(_), .. })
    }

    /// What it is, for people: `fulcrum:plugin@0.2.0 balancer and filter`.
    pub fn describe(&self) -> String {
        let what = match (self.is_balancer(), self.is_filter()) {
            (true, true) => "balancer and filter",
            (false, true) => "filter",
            _ => "balancer",
        };
        format!("fulcrum:plugin@{} {what}", self.version())
    }

    /// The WIT version the component was built against.
    pub fn version(&self) -> &'static str {
        match &self.exports {
            Exports::Current { .. } => "0.2.0",
            Exports::Legacy(_) => "0.1.0",
        }
    }
}

/// A running instance's handles to its exports.
pub enum PluginInstance {
    Current {
        lifecycle: lifecycle::Guest,
        balancer: Option<balancer::Guest>,
        filter: Option<filter::Guest>,
    },
    Legacy(v1::Balancer),
}

/// The plugin world: components of `fulcrum:plugin` 0.2.0 and 0.1.0.
pub struct PluginWorld;

/// What a balancer instance remembers of what it was told.
pub struct Pushed {
    /// Identity of the backend list last pushed (pointer of its allocation).
    pub list: *const (),
    /// The global health epoch, and the pool's push epoch, at the push.
    pub epoch: u64,
    pub pool_epoch: u64,
}

impl Default for Pushed {
    fn default() -> Self {
        Pushed {
            list: std::ptr::null(),
            epoch: u64::MAX,
            pool_epoch: u64::MAX,
        }
    }
}

thread_local! {
    static INSTANCES: Cache<PluginWorld> = const { RefCell::new(Vec::new()) };
}

impl World for PluginWorld {
    const NAME: &'static str = "fulcrum:plugin@0.2.0";
    type Pre = PluginPre;
    type Instance = PluginInstance;
    type Local = Pushed;

    fn linker() -> &'static Linker<StoreState> {
        static LINKER: OnceLock<Linker<StoreState>> = OnceLock::new();
        LINKER.get_or_init(|| {
            Runtime::get()
                .linker(|linker| {
                    v2::BalancerAndFilter::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
                    v1::Balancer::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)
                })
                .unwrap_or_else(|e| panic!("the plugin world's imports cannot be linked: {e:#}"))
        })
    }

    fn bind(pre: InstancePre<StoreState>) -> wasmtime::Result<PluginPre> {
        let component = pre.component();
        if component.get_export_index(None, V1_POLICY).is_some() {
            let legacy = v1::BalancerPre::new(pre.clone())?;
            return Ok(PluginPre {
                pre,
                exports: Exports::Legacy(legacy),
            });
        }
        let lifecycle = lifecycle::GuestIndices::new(&pre).map_err(|e| {
            wasmtime::Error::msg(format!(
                "{e}: a plugin exports `fulcrum:plugin/lifecycle@0.2.0` (its `init`) and `policy`, `request-filter` or both"
            ))
        })?;
        let balancer = optional(&pre, "policy", balancer::GuestIndices::new(&pre))?;
        let filter = optional(&pre, "request-filter", filter::GuestIndices::new(&pre))?;
        if balancer.is_none() && filter.is_none() {
            return Err(wasmtime::Error::msg(
                "it exports neither `fulcrum:plugin/policy@0.2.0` nor `fulcrum:plugin/request-filter@0.2.0`",
            ));
        }
        Ok(PluginPre {
            pre,
            exports: Exports::Current {
                lifecycle,
                balancer,
                filter,
            },
        })
    }

    fn instantiate(pre: &PluginPre, store: &mut Store<StoreState>) -> wasmtime::Result<PluginInstance> {
        match &pre.exports {
            Exports::Legacy(legacy) => Ok(PluginInstance::Legacy(legacy.instantiate(&mut *store)?)),
            Exports::Current {
                lifecycle,
                balancer,
                filter,
            } => {
                let instance = pre.pre.instantiate(&mut *store)?;
                Ok(PluginInstance::Current {
                    lifecycle: lifecycle.load(&mut *store, &instance)?,
                    balancer: balancer.as_ref().map(|b| b.load(&mut *store, &instance)).transpose()?,
                    filter: filter.as_ref().map(|f| f.load(&mut *store, &instance)).transpose()?,
                })
            }
        }
    }

    fn init(
        instance: &PluginInstance,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match instance {
            PluginInstance::Current { lifecycle, .. } => lifecycle.call_init(store, config),
            PluginInstance::Legacy(legacy) => legacy.fulcrum_plugin_policy().call_init(store, config),
        }
    }

    fn cache() -> &'static LocalKey<Cache<Self>> {
        &INSTANCES
    }
}

/// An export the component may lack: absent is `None`, present but of the
/// wrong shape is an error naming it.
fn optional<T>(pre: &InstancePre<StoreState>, name: &str, found: wasmtime::Result<T>) -> wasmtime::Result<Option<T>> {
    let export = format!("fulcrum:plugin/{name}@0.2.0");
    match found {
        Ok(indices) => Ok(Some(indices)),
        Err(_) if pre.component().get_export_index(None, &export).is_none() => Ok(None),
        Err(e) => Err(wasmtime::Error::msg(format!(
            "its `{export}` is not the one of 0.2.0: {e}"
        ))),
    }
}
