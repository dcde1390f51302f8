package outbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"
)

// ErrDeadLetterNotFound is returned by Admin.DeadLetter for an id that is not
// in the dead-letter table (never dead, or replayed or purged since).
var ErrDeadLetterNotFound = errors.New("outbox: no such dead letter")

// DeadEnvelope is a dead letter's message as it was staged: the forwarder
// envelope its row holds.
type DeadEnvelope struct {
	// Destination is the topic the message was staged for.
	Destination string `json:"destination_topic"`
	// UUID is the Watermill message UUID.
	UUID string `json:"uuid"`
	// Payload is the message body as staged (the marshalled value).
	Payload []byte `json:"payload"`
	// Metadata holds the message's headers (kind, partition key,
	// correlation id, tenant, ...).
	Metadata map[string]string `json:"metadata"`
}

// Envelope decodes the message of l. A row that is not a forwarder
// envelope (it was dead-lettered because it could not be unwrapped) returns
// an error; l.Payload still holds its bytes.
func (l DeadLetter) Envelope() (DeadEnvelope, error) {
	var e DeadEnvelope
	if err := json.Unmarshal(l.Payload, &e); err != nil {
		return DeadEnvelope{}, fmt.Errorf("outbox: dead letter %d: the row is not a forwarder envelope: %w", l.ID, err)
	}
	return e, nil
}

// Group is the failure group of l: see DeadGroup.
func (l DeadLetter) Group() string {
	dest := ""
	if e, err := l.Envelope(); err == nil {
		dest = e.Destination
	}
	return groupID(l.Kind, dest, NormalizeError(l.LastError))
}

// DeadGroup is a set of dead letters that failed the same way: the same
// message kind, the same destination topic and the same error once the
// parts that vary from message to message (numbers, ids, UUIDs, hex) are
// masked by NormalizeError. A broker misconfiguration that dead-letters
// 10,000 messages is one group of 10,000.
type DeadGroup struct {
	// ID names the group: "g" and 10 hex digits of a hash of kind,
	// destination and normalized error, stable across runs and processes.
	ID          string `json:"id"`
	Kind        string `json:"kind"`
	Destination string `json:"destination"`
	// Error is the normalized error.
	Error string `json:"error"`
	Count int    `json:"count"`
	// FirstDeadAt and LastDeadAt bound when its letters died.
	FirstDeadAt time.Time `json:"first_dead_at"`
	LastDeadAt  time.Time `json:"last_dead_at"`
	// SampleID is the lowest id in the group, for DeadLetter.
	SampleID int64 `json:"sample_id"`
}

var (
	normUUID = regexp.MustCompile(`(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b`)
	normHex  = regexp.MustCompile(`(?i)\b(?:0x)?[0-9a-f]{8,}\b`)
	normNum  = regexp.MustCompile(`\d+`)
)

// NormalizeError masks the parts of an error message that differ between
// messages failing for the same reason — UUIDs, hex strings of 8 or more
// digits, numbers — and collapses white space, so that the errors of one
// cause compare equal. The result is at most 300 bytes.
func NormalizeError(msg string) string {
	s := strings.Join(strings.Fields(msg), " ")
	s = normUUID.ReplaceAllString(s, "<uuid>")
	s = normHex.ReplaceAllStringFunc(s, func(h string) string {
		if strings.ContainsAny(h, "0123456789") { // not a word like "deadbeef"
			return "<hex>"
		}
		return h
	})
	s = normNum.ReplaceAllString(s, "<n>")
	if len(s) > 300 {
		s = s[:300]
	}
	return s
}

func groupID(kind, dest, normErr string) string {
	h := sha256.Sum256([]byte(kind + "\x00" + dest + "\x00" + normErr))
	return "g" + hex.EncodeToString(h[:5])
}

// IsGroupID reports whether s has the form of a DeadGroup.ID.
func IsGroupID(s string) bool {
	if len(s) != 11 || s[0] != 'g' {
		return false
	}
	_, err := hex.DecodeString(s[1:])
	return err == nil && strings.ToLower(s) == s
}

// DeadLetter returns the dead letter id, or ErrDeadLetterNotFound.
func (a *Admin) DeadLetter(ctx context.Context, id int64) (DeadLetter, error) {
	ls, err := a.ListDead(ctx, DeadFilter{IDs: []int64{id}}, 0, 1)
	if err != nil {
		return DeadLetter{}, err
	}
	if len(ls) == 0 {
		return DeadLetter{}, fmt.Errorf("%w: %d", ErrDeadLetterNotFound, id)
	}
	return ls[0], nil
}

// MissingDead returns the ids of ids that are not in the dead-letter table,
// in the order given.
func (a *Admin) MissingDead(ctx context.Context, ids []int64) ([]int64, error) {
	var missing []int64
	for chunk := range slices.Chunk(ids, 1000) {
		found, err := a.deadIDs(ctx, DeadFilter{IDs: chunk}, 0, len(chunk)+1)
		if err != nil {
			return nil, fmt.Errorf("outbox: look up dead letters: %w", err)
		}
		for _, id := range chunk {
			if !slices.Contains(found, id) {
				missing = append(missing, id)
			}
		}
	}
	return missing, nil
}

// DeadGroups groups the dead letters f selects (f.Groups included) by
// failure, largest group first (then the most recent). It reads every
// selected letter, in pages of 500: narrow f with Kind or Since on a large
// table.
func (a *Admin) DeadGroups(ctx context.Context, f DeadFilter) ([]DeadGroup, error) {
	byID := map[string]*DeadGroup{}
	err := a.scanDead(ctx, f, 0, func(l DeadLetter, group, dest string) bool {
		g := byID[group]
		if g == nil {
			g = &DeadGroup{ID: group, Kind: l.Kind, Destination: dest, Error: NormalizeError(l.LastError),
				FirstDeadAt: l.DeadAt, LastDeadAt: l.DeadAt, SampleID: l.ID}
			byID[group] = g
		}
		g.Count++
		if l.DeadAt.Before(g.FirstDeadAt) {
			g.FirstDeadAt = l.DeadAt
		}
		if l.DeadAt.After(g.LastDeadAt) {
			g.LastDeadAt = l.DeadAt
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	out := make([]DeadGroup, 0, len(byID))
	for _, g := range byID {
		out = append(out, *g)
	}
	slices.SortFunc(out, func(x, y DeadGroup) int {
		if x.Count != y.Count {
			return y.Count - x.Count
		}
		if c := y.LastDeadAt.Compare(x.LastDeadAt); c != 0 {
			return c
		}
		return strings.Compare(x.ID, y.ID)
	})
	return out, nil
}

// scanDead calls fn for every dead letter f selects with an id above
// after, by id, until fn returns false. Groups in f are applied here, on
// the decoded rows.
func (a *Admin) scanDead(ctx context.Context, f DeadFilter, after int64, fn func(l DeadLetter, group, dest string) bool) error {
	sqlF := f
	sqlF.Groups, sqlF.IDs = nil, nil
	if len(f.Groups) == 0 {
		sqlF.IDs = f.IDs
	}
	for {
		page, err := a.listDeadSQL(ctx, sqlF, after, 500)
		if err != nil {
			return err
		}
		for _, l := range page {
			dest := ""
			if e, err := l.Envelope(); err == nil {
				dest = e.Destination
			}
			group := groupID(l.Kind, dest, NormalizeError(l.LastError))
			if len(f.Groups) > 0 && !slices.Contains(f.Groups, group) && !slices.Contains(f.IDs, l.ID) {
				continue
			}
			if !fn(l, group, dest) {
				return nil
			}
		}
		if len(page) < 500 {
			return nil
		}
		after = page[len(page)-1].ID
	}
}

// listDeadSQL is ListDead without the Groups selector.
func (a *Admin) listDeadSQL(ctx context.Context, f DeadFilter, afterID int64, limit int) ([]DeadLetter, error) {
	w, args := a.where(f, afterID)
	args = append(args, limit)
	rows, err := a.db.QueryContext(ctx, `SELECT id, uuid, message_id, kind, partition_key, payload, metadata, attempts, last_error, created_at, dead_at FROM `+
		a.q.dead+` WHERE `+w+` ORDER BY id LIMIT `+a.q.ph(len(args)), args...)
	if err != nil {
		return nil, fmt.Errorf("outbox: list dead letters: %w", err)
	}
	defer rows.Close()
	out := []DeadLetter{}
	for rows.Next() {
		var l DeadLetter
		var created, dead any
		if err := rows.Scan(&l.ID, &l.UUID, &l.MessageID, &l.Kind, &l.PartitionKey, &l.Payload, &l.Metadata,
			&l.Attempts, &l.LastError, &created, &dead); err != nil {
			return nil, fmt.Errorf("outbox: list dead letters: %w", err)
		}
		l.CreatedAt, l.DeadAt = asTime(created), asTime(dead)
		out = append(out, l)
	}
	return out, rows.Err()
}

// groupedIDs returns up to limit ids above afterID that f (with Groups)
// selects.
func (a *Admin) groupedIDs(ctx context.Context, f DeadFilter, afterID int64, limit int) ([]int64, error) {
	var ids []int64
	err := a.scanDead(ctx, f, afterID, func(l DeadLetter, _, _ string) bool {
		ids = append(ids, l.ID)
		return len(ids) < limit
	})
	return ids, err
}
