// Package qga speaks the QEMU guest agent protocol: JSON commands over a
// virtio-serial channel, with guest-sync-delimited to resynchronise after
// a reconnect. The host side (Client) is what the site agent uses to
// quiesce a guest for application-consistent points; ReadObject is shared
// with ferry's own test-guest agent.
package qga

import (
	"bufio"
	"errors"
)

// ReadObject reads the next JSON object from br, skipping anything before
// its opening brace (the 0xFF sync bytes of guest-sync-delimited, newlines,
// leftovers of an earlier session). Objects are limited to 64 KiB.
func ReadObject(br *bufio.Reader) ([]byte, error) {
	for {
		c, err := br.ReadByte()
		if err != nil {
			return nil, err
		}
		if c == '{' {
			break
		}
	}
	obj := []byte{'{'}
	depth, inStr, esc := 1, false, false
	for depth > 0 {
		c, err := br.ReadByte()
		if err != nil {
			return nil, err
		}
		if c == 0xff { // a sync byte inside an object: start over
			return ReadObject(br)
		}
		obj = append(obj, c)
		if len(obj) > 64<<10 {
			return nil, errors.New("qga: object over 64 KiB")
		}
		switch {
		case esc:
			esc = false
		case inStr && c == '\\':
			esc = true
		case c == '"':
			inStr = !inStr
		case !inStr && c == '{':
			depth++
		case !inStr && c == '}':
			depth--
		}
	}
	return obj, nil
}
