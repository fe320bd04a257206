//! A valid component of a world that is not Fulcrum's: the balancer must refuse it.
// Only a Wasm component: there is nothing to build or test on the host.
#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({
    inline: "package test:other; world greeter { export greet: func() -> string; }",
    world: "greeter",
});

struct Greeter;

impl Guest for Greeter {
    fn greet() -> String {
        "hello".into()
    }
}

export!(Greeter);
