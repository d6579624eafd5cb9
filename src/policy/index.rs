//! Route lookup that does not grow with the number of routes. Routes are grouped by
//! the first segment of the paths they can match; a request only tries the routes
//! of its own first segment and those that can match any first segment (regexes,
//! `/` prefixes, host-only routes), merged back into file order so the first match
//! still wins. Envoy can also name the route outright (`context_extensions`).

use std::collections::HashMap;

use super::route::{PathMatch, Route, TemplateSegment};

/// The context_extensions key through which Envoy names the Valet route.
pub const ROUTE_CONTEXT_KEY: &str = "valet_route";

#[derive(Default)]
pub struct RouteIndex {
    by_segment: HashMap<String, Vec<usize>>,
    anywhere: Vec<usize>,
    by_name: HashMap<String, usize>,
}

impl RouteIndex {
    pub fn build(routes: &[Route]) -> Self {
        let mut index = RouteIndex::default();
        for (i, r) in routes.iter().enumerate() {
            index.by_name.insert(r.name.to_string(), i);
            match first_segment(&r.path) {
                Some(seg) => index.by_segment.entry(seg).or_default().push(i),
                None => index.anywhere.push(i),
            }
        }
        index
    }

    /// Indices of the routes that may match `path`, in file order.
    pub fn candidates<'a>(&'a self, path: &str) -> impl Iterator<Item = usize> + 'a {
        let seg = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let mut a = self
            .by_segment
            .get(seg)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .peekable();
        let mut b = self.anywhere.iter().peekable();
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x < y => a.next().copied(),
            (Some(_), Some(_)) => b.next().copied(),
            (Some(_), None) => a.next().copied(),
            (None, _) => b.next().copied(),
        })
    }

    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
}

/// The literal first segment every path the route matches starts with, if any.
fn first_segment(path: &PathMatch) -> Option<String> {
    let literal = |p: &str| {
        let seg = p.trim_start_matches('/').split('/').next().unwrap_or("");
        (!seg.is_empty()).then(|| seg.to_string())
    };
    match path {
        PathMatch::Exact(p) => Some(literal(p).unwrap_or_default()),
        // `/orders` matches `/orders` and `/orders/…`: first segment "orders".
        PathMatch::Prefix(p) => literal(p),
        PathMatch::Template(segs) => match segs.first() {
            Some(TemplateSegment::Literal(l)) => Some(l.clone()),
            _ => None,
        },
        PathMatch::Regex(_) | PathMatch::Any => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::route::Access;

    fn route(name: &str, path: PathMatch) -> Route {
        Route {
            name: name.into(),
            hosts: vec![],
            methods: vec![],
            path,
            context: vec![],
            access: Access::Anonymous,
            dry_run: false,
        }
    }

    #[test]
    fn candidates_keep_file_order() {
        let routes = vec![
            route("a", PathMatch::Prefix("/orders".into())),
            route("any", PathMatch::Any),
            route("b", PathMatch::Exact("/orders/7".into())),
            route("c", PathMatch::Prefix("/users".into())),
            route("root", PathMatch::Exact("/".into())),
            route("d", PathMatch::Prefix("/".into())),
        ];
        let idx = RouteIndex::build(&routes);
        assert_eq!(
            idx.candidates("/orders/7").collect::<Vec<_>>(),
            vec![0, 1, 2, 5]
        );
        assert_eq!(idx.candidates("/users").collect::<Vec<_>>(), vec![1, 3, 5]);
        assert_eq!(idx.candidates("/").collect::<Vec<_>>(), vec![1, 4, 5]);
        assert_eq!(idx.candidates("/other").collect::<Vec<_>>(), vec![1, 5]);
        assert_eq!(idx.by_name("c"), Some(3));
    }
}
