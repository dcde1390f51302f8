// Package secret keeps credentials out of the bus's logs and errors: it
// redacts URLs, even malformed ones, and scrubs text that libraries produced
// from a URL (net/url quotes the whole URL, password included, when an
// escape is malformed).
package secret

import (
	"errors"
	"net/url"
	"regexp"
	"strings"
)

// Mask replaces passwords in every URL the bus prints.
const Mask = "***"

// URL returns raw with its password replaced by "***"
// (amqp://user:***@host/vhost). It works on malformed input too — a bad
// %-escape, a missing scheme — so it is safe to call on whatever a user
// configured before it was validated.
func URL(raw string) string {
	prefix, rest := splitScheme(raw)
	end := len(rest)
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		end = i
	}
	authority, tail := rest[:end], rest[end:]
	at := strings.LastIndex(authority, "@")
	if at < 0 {
		return raw
	}
	userinfo, host := authority[:at], authority[at+1:]
	if c := strings.Index(userinfo, ":"); c >= 0 {
		userinfo = userinfo[:c+1] + Mask
	}
	return prefix + userinfo + "@" + host + tail
}

// Scrubber removes a URL's secrets from text produced by libraries that may
// echo the URL (net/url does, on a bad escape).
type Scrubber struct{ r *strings.Replacer }

func NewScrubber(raw string) Scrubber {
	pairs := []string{raw, URL(raw)}
	// Very short passwords are not replaced on their own: they would mangle
	// unrelated text and are not echoed by the libraries used here anyway.
	if pw := Password(raw); len(pw) >= 3 {
		pairs = append(pairs, pw, Mask)
		if un, err := url.PathUnescape(pw); err == nil && un != pw && len(un) >= 3 {
			pairs = append(pairs, un, Mask)
		}
	}
	return Scrubber{strings.NewReplacer(pairs...)}
}

// String scrubs s.
func (s Scrubber) String(str string) string {
	if s.r == nil {
		return str
	}
	return s.r.Replace(str)
}

// Error returns err with its message scrubbed; errors.Is/As still see the
// original chain (whose values carry no URL: only the message text does).
func (s Scrubber) Error(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	clean := s.String(msg)
	if clean == msg {
		return err
	}
	return &scrubbedError{msg: clean, err: err}
}

type scrubbedError struct {
	msg string
	err error
}

func (e *scrubbedError) Error() string { return e.msg }
func (e *scrubbedError) Unwrap() error { return e.err }

// Password returns the password part of raw's user info, still escaped,
// or "".
func Password(raw string) string {
	_, rest := splitScheme(raw)
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	at := strings.LastIndex(rest, "@")
	if at < 0 {
		return ""
	}
	userinfo := rest[:at]
	if c := strings.Index(userinfo, ":"); c >= 0 {
		return userinfo[c+1:]
	}
	return ""
}

// Parse parses raw as a URL. Its errors show the URL redacted and never
// quote the password, even when the password itself is malformed.
func Parse(raw string) (*url.URL, error) {
	red := URL(raw)
	_, rest := splitScheme(raw)
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		user, pass, _ := strings.Cut(rest[:at], ":")
		if _, err := url.PathUnescape(user); err != nil {
			return nil, &parseError{red, "the user name has a malformed %-escape"}
		}
		if _, err := url.PathUnescape(pass); err != nil {
			return nil, &parseError{red, "the password has a malformed %-escape (escape % as %25)"}
		}
	}
	u, err := url.Parse(raw)
	if err != nil {
		msg := err.Error()
		var ue *url.Error
		if errors.As(err, &ue) {
			msg = ue.Err.Error()
		}
		return nil, &parseError{red, NewScrubber(raw).String(msg)}
	}
	return u, nil
}

type parseError struct{ url, msg string }

func (e *parseError) Error() string { return e.url + ": " + e.msg }

// schemeSlashes matches a scheme followed by one or more slashes: the
// prefix before a URL's user info, also when mistyped ("amqp:/u:p@h").
var schemeSlashes = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*:/+`)

// splitScheme splits raw into the scheme with its slashes and the rest,
// which starts with the user info if there is one. A string without
// "scheme:/" has no prefix ("u:p@h" is user info, not a scheme).
func splitScheme(raw string) (prefix, rest string) {
	if i := strings.Index(raw, "://"); i >= 0 {
		return raw[:i+3], raw[i+3:]
	}
	if m := schemeSlashes.FindString(raw); m != "" {
		return m, raw[len(m):]
	}
	return "", raw
}
