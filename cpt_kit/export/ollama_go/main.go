// Renders an Ollama TEMPLATE the way Ollama's server does for a chat request, and parses
// Modelfiles with a copy of Ollama's parser. Standard library only (tests build it offline).
//
//	ollamatmpl render < {"template": "...", "system": "...", "messages": [{"role", "content"}]}
//	ollamatmpl parse  < Modelfile text   (prints the commands as JSON [[name, args], ...])
//
// Rendering follows ollama/server/routes.go (the Modelfile's SYSTEM is prepended as a system
// message when the first message is not one) and ollama/template/template.go (collate merges
// consecutive messages of one role and joins system messages into .System; templates that use
// .Messages get System/Messages/Tools/Response; the others get .System/.Prompt/.Response).
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

var funcs = template.FuncMap{
	"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			m := msgs[i]
			collated = append(collated, &m)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func render(req Request, w io.Writer) error {
	msgs := req.Messages
	if req.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: req.System}}, msgs...)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		return err
	}
	system, messages := collate(msgs)
	if strings.Contains(req.Template, ".Messages") {
		return tmpl.Execute(w, map[string]any{
			"System": system, "Messages": messages, "Tools": nil, "Response": "", "Think": false,
		})
	}
	// legacy templates ({{ .Prompt }}): the last user message is the prompt
	prompt := ""
	for _, m := range messages {
		if m.Role == "user" {
			prompt = m.Content
		}
	}
	return tmpl.Execute(w, map[string]any{"System": system, "Prompt": prompt, "Response": ""})
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: ollamatmpl render|parse < input")
		os.Exit(2)
	}
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	switch os.Args[1] {
	case "render":
		var req Request
		if err := json.Unmarshal(input, &req); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if err := render(req, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "parse":
		cmds, err := ParseFile(strings.NewReader(string(input)))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out, _ := json.Marshal(cmds)
		os.Stdout.Write(out)
	default:
		os.Exit(2)
	}
}
