#!/usr/bin/env python3
"""The IAM policies template.yaml gives each function, after the SAM
transform, resolved to a test's own resources; and IAM decisions for calls.

Offline: the template is parsed with cfn-lint's decoder (short-form tags),
transformed with aws-sam-translator (no managed-policy lookups), and each
function role's inline policies are resolved (Ref, Fn::GetAtt, Fn::Sub,
Fn::If on the template's Conditions, Fn::Join, Fn::Select, AWS::NoValue).
The AWS managed policies SAM attaches (AWSLambdaBasicExecutionRole, and
AWSLambdaDynamoDBExecutionRole for a stream-triggered function) come from
moto's bundled copy of AWS's managed policies.

Input, one JSON object on stdin:
  template    path of template.yaml
  parameters  {ParameterName: value} (the rest take their defaults)
  resources   {LogicalId: {"Ref": .., "Arn": .., "StreamArn": .., ...}}
              the physical values Ref and Fn::GetAtt resolve to
  region, account, partition   (default us-east-1, 123456789012, aws)
  checks      optional [{"function", "action", "resource"}]

Output, one JSON object on stdout:
  policies    {FunctionLogicalId: [policy documents]}
  decisions   (with checks) the checks, each with "decision":
              PERMITTED | DENIED | NEUTRAL (NEUTRAL: nothing allows it,
              which IAM answers with AccessDenied), evaluated by moto's
              IAM evaluator (moto.iam.access_control.IAMPolicy), the one its
              own enforcement uses.
"""

import copy
import json
import os
import sys


class NoManagedPolicies:
    def load(self):
        return {}


NO_VALUE = object()


class Resolver:
    def __init__(self, template, parameters, resources, region, account, partition):
        self.template = template
        self.resources = resources
        self.pseudo = {
            "AWS::Region": region,
            "AWS::AccountId": account,
            "AWS::Partition": partition,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": "hubcap",
            "AWS::StackId": f"arn:{partition}:cloudformation:{region}:{account}:stack/hubcap/0",
            "AWS::NoValue": NO_VALUE,
        }
        self.params = {}
        for name, spec in template.get("Parameters", {}).items():
            if name in parameters:
                value = parameters[name]
            elif "Default" in spec:
                value = spec["Default"]
            else:
                raise SystemExit(f"sam_policies: parameter {name} has no default: pass it")
            if spec.get("Type") == "CommaDelimitedList" and isinstance(value, str):
                value = [v.strip() for v in value.split(",")] if value else [""]
            self.params[name] = value
        unknown = set(parameters) - set(self.params)
        if unknown:
            raise SystemExit(f"sam_policies: unknown parameters {sorted(unknown)}")
        self.conditions = {}

    def condition(self, name):
        if name not in self.conditions:
            self.conditions[name] = bool(self.value(self.template["Conditions"][name]))
        return self.conditions[name]

    def ref(self, name):
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.params:
            return self.params[name]
        try:
            return self.resources[name]["Ref"]
        except KeyError:
            raise SystemExit(f"sam_policies: no value for Ref {name} (pass resources.{name}.Ref)")

    def getatt(self, name, attr):
        try:
            return self.resources[name][attr]
        except KeyError:
            raise SystemExit(f"sam_policies: no value for Fn::GetAtt {name}.{attr} (pass resources.{name}.{attr})")

    def sub(self, text, local):
        out, i = "", 0
        while i < len(text):
            j = text.find("${", i)
            if j < 0:
                out += text[i:]
                break
            out += text[i:j]
            if text.startswith("${!", j):
                out += "${"
                i = j + 3
                continue
            k = text.index("}", j)
            var = text[j + 2 : k]
            if var in local:
                out += str(local[var])
            elif "." in var and not var.startswith("AWS::"):
                name, attr = var.split(".", 1)
                out += str(self.getatt(name, attr))
            else:
                out += str(self.ref(var))
            i = k + 1
        return out

    def value(self, v):
        if isinstance(v, list):
            items = [self.value(x) for x in v]
            return [x for x in items if x is not NO_VALUE]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            (key, arg), = v.items()
            if key == "Ref":
                return self.ref(arg)
            if key == "Fn::GetAtt":
                name, attr = arg if isinstance(arg, list) else arg.split(".", 1)
                return self.getatt(name, attr)
            if key == "Fn::Sub":
                if isinstance(arg, list):
                    local = {k: self.value(x) for k, x in arg[1].items()}
                    return self.sub(arg[0], local)
                return self.sub(arg, {})
            if key == "Fn::If":
                cond, yes, no = arg
                return self.value(yes if self.condition(cond) else no)
            if key == "Fn::Equals":
                a, b = (self.value(x) for x in arg)
                return a == b
            if key == "Fn::Not":
                return not self.value(arg[0])
            if key == "Fn::And":
                return all(self.value(x) for x in arg)
            if key == "Fn::Or":
                return any(self.value(x) for x in arg)
            if key == "Condition":
                return self.condition(arg)
            if key == "Fn::Join":
                sep, items = arg
                items = self.value(items)
                return sep.join(str(x) for x in items)
            if key == "Fn::Select":
                index, items = arg
                return self.value(items)[int(self.value(index))]
            if key.startswith("Fn::"):
                raise SystemExit(f"sam_policies: {key} is not supported in a policy")
        out = {}
        for k, x in v.items():
            x = self.value(x)
            if x is not NO_VALUE:
                out[k] = x
        return out


def managed_policy(arn):
    from moto.iam.aws_managed_policies import aws_managed_policies_data

    name = arn.rsplit("/", 1)[-1]
    data = json.loads(aws_managed_policies_data)
    if name not in data:
        raise SystemExit(f"sam_policies: managed policy {arn} is unknown offline")
    return data[name]["Document"]


def function_policies(spec):
    os.environ.setdefault("AWS_DEFAULT_REGION", spec.get("region", "us-east-1"))
    from cfnlint.decode import decode
    from samtranslator.translator.transform import transform

    template, problems = decode(spec["template"])
    if problems or template is None:
        raise SystemExit(f"sam_policies: {spec['template']}: {[str(p) for p in problems]}")
    template = json.loads(json.dumps(template, default=str))
    functions = []
    for name, res in template.get("Resources", {}).items():
        if res.get("Type") == "AWS::Serverless::Function":
            res["Properties"]["CodeUri"] = f"s3://hubcap-code/{name}.zip"
            functions.append(name)
    parameters = spec.get("parameters", {})
    out = transform(copy.deepcopy(template), parameters, NoManagedPolicies())
    resolver = Resolver(
        out,
        parameters,
        spec.get("resources", {}),
        spec.get("region", "us-east-1"),
        spec.get("account", "123456789012"),
        spec.get("partition", "aws"),
    )
    policies = {}
    for name in functions:
        fn = out["Resources"][name]
        role_ref = fn["Properties"].get("Role")
        role_name = role_ref.get("Fn::GetAtt", [None])[0] if isinstance(role_ref, dict) else None
        if role_name not in out["Resources"]:
            raise SystemExit(f"sam_policies: {name} has no role made by the template ({role_ref})")
        role = out["Resources"][role_name]["Properties"]
        docs = [resolver.value(p["PolicyDocument"]) for p in role.get("Policies", [])]
        docs += [managed_policy(resolver.value(a)) for a in role.get("ManagedPolicyArns", [])]
        policies[name] = docs
    return policies


def supported(name, documents):
    """moto's evaluator ignores NotResource (a statement with it would allow
    any resource) and denies on a Condition it has no context for: refuse
    to decide rather than decide wrong."""
    for doc in documents:
        statements = doc["Statement"] if isinstance(doc["Statement"], list) else [doc["Statement"]]
        for st in statements:
            for key in ("NotResource", "Condition", "NotPrincipal"):
                if key in st:
                    raise SystemExit(f"sam_policies: {name}: a statement with {key} cannot be evaluated offline: {json.dumps(st)}")


def decide(documents, action, resource):
    from moto.iam.access_control import IAMPolicy, PermissionResult

    permitted = False
    for doc in documents:
        result = IAMPolicy(json.dumps(doc)).is_action_permitted(action, resource)
        if result == PermissionResult.DENIED:
            return "DENIED"
        if result == PermissionResult.PERMITTED:
            permitted = True
    return "PERMITTED" if permitted else "NEUTRAL"


def main():
    spec = json.load(sys.stdin)
    policies = function_policies(spec)
    result = {"policies": policies}
    if "checks" in spec:
        for name, docs in policies.items():
            supported(name, docs)
        decisions = []
        for check in spec["checks"]:
            docs = policies.get(check["function"])
            if docs is None:
                raise SystemExit(f"sam_policies: no function {check['function']} in {spec['template']}")
            decisions.append(dict(check, decision=decide(docs, check["action"], check["resource"])))
        result["decisions"] = decisions
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
