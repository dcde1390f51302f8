// Package policy decides where each outgoing message goes, from JSON files
// instead of code.
//
// A service publishes to several brokers (RabbitMQ, NATS, Kafka, ...) and the
// right destination depends on the message: its kind, its business domain,
// the tenant's tier, any header. Hard-coding that in Go means a release for
// every routing change, and no one outside the team can read it. A policy is a
// priority-ranked list of JSON rules, in the shape of the Juice
// "PublishingPolicies" configuration, that operators can read, lint, explain
// and reload without a restart. No Go library offered it; this package is that
// engine: strict loading with file:line:column errors, a compiled immutable
// matcher, lint, explain and hot reload. The bus package's routing publisher
// calls Resolve for every message the outbox relay forwards.
//
// # Format
//
//	{
//	  "Default": {"Publishers": [{"Key": "rabbitmq", "Destination": "default_exchange"}]},
//	  "Rules": [
//	    {"Name": "vip", "Priority": 1000,
//	     "Match": {"Event": "ContentPublished*", "TenantTier": ["enterprise", "gold"]},
//	     "Publishers": [{"Key": "rabbitmq", "Destination": "x.content.vip"}]}
//	  ]
//	}
//
// Keys are accepted in PascalCase (as above, and as in the Juice seed, which
// may also be wrapped in {"PublishingPolicies": {...}}) or camelCase; any
// other key is an error. Match keys Event, Domain and TenantTier test the
// metadata keys tailrace.MetaKind, tailrace.MetaDomain and
// tailrace.MetaTenantTier; any other Match key names a metadata key as is.
//
// # Semantics
//
//   - Rules are tried from the highest Priority down; rules of equal priority
//     in load order (files in the order given, a directory's *.json files in
//     lexical order, rules as written). The first matching rule decides.
//   - A rule matches when every condition holds; an empty Match matches every
//     message. A condition holds when the attribute is present and non-empty
//     and equals one of the values (a string, or a list meaning any of).
//     Values containing * ? [ or \ are globs with path.Match syntax: * and ?
//     do not match "/".
//   - A rule with "Continue": true adds its routes and lets evaluation go on;
//     the routes of all matching rules up to the first one without Continue
//     are used, each (Key, Destination) once.
//   - Default is an implicit last rule that matches everything. Without a
//     Default, a message nothing decides has no route (ErrNoRoute), unless
//     Continue rules matched: then their routes are used.
//
// docs/policy.md in the repository is the full reference, with worked
// examples.
//
// # Use
//
// Load (or LoadSources, Parse) compiles files into a *Policy; Resolve returns
// the routes for a message's metadata without allocating, with the policy
// Version and rule name to stamp as tailrace.MetaPolicyVersion and
// tailrace.MetaPolicyRule. Explain and Lint serve the tailrace CLI (tailrace
// policy explain, tailrace policy lint). A Watcher reloads the files when they
// change and swaps the policy atomically, keeping the last good one when a
// change is invalid. The routing publisher takes a Provider: a *Watcher, or
// Static(p) for a fixed policy; ProviderSet provides the Watcher for Wire.
package policy
