//! A valid component of a world that is not Fulcrum's: the balancer must refuse it.

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
