//! `#[derive(Command)]`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{Attribute, Data, DeriveInput, Fields, Ident, LitStr, Path};

/// Where the stream's category comes from.
enum Category {
    Literal(LitStr),
    Aggregate(Path),
}

#[derive(Default)]
struct ContainerAttrs {
    category: Option<Category>,
    id: Option<Ident>,
}

fn parse_container(attrs: &[Attribute]) -> syn::Result<ContainerAttrs> {
    let mut parsed = ContainerAttrs::default();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("command")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("category") {
                parsed.category = Some(Category::Literal(meta.value()?.parse()?));
                Ok(())
            } else if meta.path.is_ident("aggregate") {
                parsed.category = Some(Category::Aggregate(meta.value()?.parse()?));
                Ok(())
            } else if meta.path.is_ident("id") {
                parsed.id = Some(meta.value()?.parse()?);
                Ok(())
            } else {
                Err(meta.error("expected `aggregate = Type`, `category = \"...\"` or `id = field`"))
            }
        })?;
    }
    Ok(parsed)
}

/// Whether a field carries `#[command(id)]`.
fn is_marked_id(attrs: &[Attribute]) -> syn::Result<bool> {
    let mut marked = false;
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("command")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("id") {
                marked = true;
                Ok(())
            } else {
                Err(meta.error("on a field, only `#[command(id)]` is known"))
            }
        })?;
    }
    Ok(marked)
}

/// The pattern that binds the id field of `fields` to `id`, after `prefix` (`Self` or
/// `Self::Variant`).
fn id_pattern(prefix: TokenStream, fields: &Fields, default: &Ident, span_of: &Ident) -> syn::Result<TokenStream> {
    match fields {
        Fields::Named(named) => {
            let mut chosen = None;
            for field in &named.named {
                if is_marked_id(&field.attrs)? {
                    chosen = field.ident.clone();
                }
            }
            let chosen = match chosen {
                Some(chosen) => chosen,
                None => named.named.iter().filter_map(|f| f.ident.clone()).find(|ident| ident == default).ok_or_else(
                    || {
                        syn::Error::new_spanned(
                            span_of,
                            format!(
                                "no field `{default}` to route by: name it with #[command(id = field)] or mark a \
                                 field #[command(id)]"
                            ),
                        )
                    },
                )?,
            };
            Ok(quote!(#prefix { #chosen: id, .. }))
        }
        Fields::Unnamed(unnamed) => {
            let mut position = None;
            for (index, field) in unnamed.unnamed.iter().enumerate() {
                if is_marked_id(&field.attrs)? {
                    position = Some(index);
                }
            }
            let position = position.ok_or_else(|| {
                syn::Error::new_spanned(span_of, "mark the field that identifies the instance with #[command(id)]")
            })?;
            let bindings =
                (0..unnamed.unnamed.len()).map(|index| if index == position { quote!(id) } else { quote!(_) });
            Ok(quote!(#prefix(#(#bindings),*)))
        }
        Fields::Unit => {
            Err(syn::Error::new_spanned(span_of, "a command without fields cannot name the instance it is for"))
        }
    }
}

pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    let container = parse_container(&input.attrs)?;
    let category = match container.category {
        Some(Category::Literal(literal)) => quote!(#literal),
        Some(Category::Aggregate(path)) => quote!(<#path as ::cqrs_core::Aggregate>::CATEGORY),
        None => {
            return Err(syn::Error::new_spanned(
                &input.ident,
                "add #[command(aggregate = Type)] or #[command(category = \"...\")] to route the command",
            ))
        }
    };
    let default_id = container.id.unwrap_or_else(|| format_ident!("id"));
    let arms = match &input.data {
        Data::Struct(data) => vec![id_pattern(quote!(Self), &data.fields, &default_id, &input.ident)?],
        Data::Enum(data) => data
            .variants
            .iter()
            .map(|variant| {
                let ident = &variant.ident;
                id_pattern(quote!(Self::#ident), &variant.fields, &default_id, ident)
            })
            .collect::<syn::Result<_>>()?,
        Data::Union(_) => return Err(syn::Error::new_spanned(&input.ident, "Command cannot be derived for a union")),
    };
    let ident = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::cqrs_core::Command for #ident #type_generics #where_clause {
            fn stream_id(&self) -> ::core::result::Result<::cqrs_core::StreamId, ::cqrs_core::StreamIdError> {
                let id: &dyn ::core::fmt::Display = match self {
                    #(#arms => id,)*
                };
                ::cqrs_core::StreamId::for_aggregate(#category, id)
            }
        }
    })
}
